// One patient's studies (the IHE IID PATIENT target): the FHIR Patient and its
// ImagingStudy resources, fetched with the session; only what the caller may see.
"use strict";

const {api, el, clear} = DS;

function patientId() {
  const parts = location.pathname.split("/");
  return decodeURIComponent(parts[parts.length - 1] || "");
}

function fhirError(err) {
  return err instanceof DS.ApiError && err.status === 404
    ? new Error("This patient does not exist or you may not see their studies.") : err;
}

async function fhir(path) {
  try {
    return await api.raw("GET", path, undefined, "application/fhir+json");
  } catch (err) {
    throw fhirError(err);
  }
}

function showPatient(patient) {
  const name = (patient.name && patient.name[0]) || {};
  const ident = (patient.identifier && patient.identifier[0]) || {};
  document.getElementById("patient-name").textContent = name.text || "";
  document.getElementById("patient-id").textContent = ident.value || "";
  document.getElementById("patient-birth").textContent = patient.birthDate || "";
  document.getElementById("patient-gender").textContent = patient.gender || "";
  if (name.text) document.title = `${name.text} · dicomshare`;
}

// Links to the timeline (/app/timeline/<record>) of the patient records with this
// PatientID that the caller sees (one per issuer or organisation).
async function timelineLinks(pid) {
  if (!pid) return;
  const found = await api.get(`/api/patients?patient_id=${encodeURIComponent(pid)}`);
  if (!found || !found.length) return;
  const links = el("p", {testid: "timeline-links"}, "Whole imaging history: ");
  found.forEach((rec, i) => {
    const where = rec.issuer_of_patient_id || rec.organisation || "";
    links.append(i ? ", " : "", el("a", {
      href: `/app/timeline/${encodeURIComponent(rec.id)}`, testid: "timeline-link",
      text: found.length > 1 && where ? `timeline (${where})` : "timeline"}));
  });
  document.querySelector("main section").append(links);
}

function row(study) {
  const modalities = (study.modality || []).map((m) => m.code).join(", ");
  const view = el("a", {href: `/app/view/${encodeURIComponent(study.id)}`,
                        text: "View images", testid: "view-study"});
  return el("tr", {testid: "patient-study", dataset: {studyUid: study.id}},
    el("td", {text: (study.started || "").slice(0, 10)}),
    el("td", {text: study.description || ""}), el("td", {text: modalities}),
    el("td", {text: String(study.numberOfSeries || 0)}),
    el("td", {text: String(study.numberOfInstances || 0)}), el("td", {}, view));
}

async function main() {
  await DS.start();
  const id = patientId();
  const patient = await fhir(`/fhir/Patient/${encodeURIComponent(id)}`);
  showPatient(patient);
  const ident = (patient.identifier && patient.identifier[0]) || {};
  timelineLinks(ident.value).catch(() => {}); // a convenience: the page works without it
  const body = clear(document.getElementById("studies"));
  const more = document.getElementById("more");
  let next = `/fhir/ImagingStudy?patient=${encodeURIComponent(id)}&_count=50`;
  async function page() {
    const bundle = await fhir(next);
    for (const entry of bundle.entry || []) body.append(row(entry.resource));
    const link = (bundle.link || []).find((l) => l.relation === "next");
    const url = link ? new URL(link.url, location.href) : null;
    next = url ? url.pathname + url.search : null;
    more.hidden = !next;
    document.getElementById("no-studies").hidden = body.children.length > 0;
  }
  more.addEventListener("click", () => page().catch((err) => {
    DS.say(document.getElementById("page-error"), DS.reason(err));
  }));
  await page();
}

DS.run(main);
