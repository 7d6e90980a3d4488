// One person's imaging history: GET /api/patients/<record>/timeline (every study the
// caller may see, across organisations and linked records, oldest first), filters by
// modality and date, "View images" and "Compare with…" (a prior from
// /api/studies/<uid>/priors, then the comparison page); the linked records, and the
// proposed links the caller may confirm or reject. Server data goes in as text only.
// A prior on another archive is fetched as a background job whose progress is shown.
"use strict";

const {api, el, clear, say} = DS;

const page = {ref: "", me: null, modalities: new Set()};

function recordRef() {
  // /app/timeline/<record id>
  const parts = location.pathname.split("/").filter(Boolean);
  return decodeURIComponent(parts[2] || "");
}

function dicomDate(text) {
  const m = /^(\d{4})(\d{2})(\d{2})$/.exec(text || "");
  return m ? `${m[1]}-${m[2]}-${m[3]}` : (text || "");
}

function personName(text) {
  return (text || "").split("=")[0].replace(/\^+/g, " ").trim();
}

function recordLabel(rec) {
  const where = rec.issuer_of_patient_id ? `issuer ${rec.issuer_of_patient_id}`
    : (rec.organisation || "organisation");
  return `${rec.patient_id} (${where})`;
}

function status(study) {
  const parts = [];
  if (study.reported) parts.push("Reported");
  for (const c of study.consults || []) {
    parts.push(`Consult ${c.state}${c.urgency && c.urgency !== "routine"
      ? ` (${c.urgency})` : ""}`);
  }
  return parts.join("; ") || "—";
}

function showPatient(rec) {
  document.getElementById("patient-name").textContent = personName(rec.patient_name);
  document.getElementById("patient-id").textContent = recordLabel(rec);
  document.getElementById("patient-birth").textContent = dicomDate(rec.birth_date);
  document.getElementById("patient-sex").textContent = rec.sex || "";
  const name = personName(rec.patient_name);
  if (name) document.title = `${name} · timeline · dicomshare`;
}

function priorLabel(p) {
  return [dicomDate(p.study_date), (p.modalities || []).join(", "), p.description,
          (p.organisations || []).join(", ")].filter(Boolean).join(" · ") || p.study_uid;
}

// The "Compare with…" row under a study: its priors as links to the comparison page.
async function showPriors(study, row, button) {
  const next = row.nextElementSibling;
  if (next && next.dataset.priorsOf === study.study_uid) {
    next.remove();
    button.setAttribute("aria-expanded", "false");
    return;
  }
  const cell = el("td", {colSpan: 7});
  const holder = el("tr", {className: "priors", testid: "priors",
                           dataset: {priorsOf: study.study_uid}}, cell);
  row.after(holder);
  button.setAttribute("aria-expanded", "true");
  cell.append(el("span", {className: "muted", text: "Looking for priors…"}));
  let found;
  try {
    found = await api.get(`/api/studies/${encodeURIComponent(study.study_uid)}/priors`);
  } catch (err) {
    clear(cell).append(el("div", {className: "message error", role: "alert",
                                  text: DS.reason(err)}));
    return;
  }
  const local = (found.priors || []).filter((p) => p.source !== "remote");
  clear(cell);
  if (!local.length) {
    cell.append(el("span", {className: "muted", testid: "no-priors",
                            text: "No earlier comparable study (same modality or body part)."}));
  } else {
    const list = el("ul", {});
    for (const p of local) list.append(el("li", {}, compareLink(study, p)));
    cell.append(el("strong", {text: "Compare with a prior:"}), list);
  }
  const more = el("button", {type: "button", className: "small secondary",
                             text: "Search other archives", testid: "search-remote"});
  const remoteBox = el("div", {testid: "remote-priors"});
  more.addEventListener("click", () => showRemotePriors(study, remoteBox, more));
  cell.append(el("div", {}, more), remoteBox);
}

function compareLink(study, p) {
  const href = `/app/compare/${encodeURIComponent(study.study_uid)}/` +
    `${encodeURIComponent(p.study_uid)}?patient=${encodeURIComponent(page.ref)}`;
  return el("a", {href, testid: "prior-link", dataset: {studyUid: p.study_uid},
                  text: `Compare with ${priorLabel(p)}`});
}

// Priors held by the archives registered for the caller's organisation (C-FIND on the
// person's PatientIDs); each can be fetched here (C-GET), then compared like a local one.
async function showRemotePriors(study, box, button) {
  button.disabled = true;
  clear(box).append(el("span", {className: "muted", text: "Asking the other archives…"}));
  let found;
  try {
    found = await api.get(`/api/studies/${encodeURIComponent(study.study_uid)}/priors` +
                          "?remote=*");
  } catch (err) {
    clear(box).append(el("div", {className: "message error", role: "alert",
                                 text: DS.reason(err)}));
    button.disabled = false;
    return;
  }
  clear(box);
  for (const e of found.remote_errors || []) {
    box.append(el("div", {className: "message error", role: "alert", testid: "remote-error",
                          text: `${e.remote}: ${e.error}`}));
  }
  const remote = (found.priors || []).filter((p) => p.source === "remote");
  if (!remote.length) {
    box.append(el("span", {className: "muted", testid: "no-remote-priors",
                           text: "No other archive holds an earlier comparable study."}));
    return;
  }
  const list = el("ul", {});
  for (const p of remote) {
    const fetchButton = el("button", {type: "button", className: "small",
                                      text: `Fetch from ${p.remote}`, testid: "fetch-prior"});
    const item = el("li", {testid: "remote-prior", dataset: {studyUid: p.study_uid}},
                    `${priorLabel(p)} (at ${p.remote}) `, fetchButton);
    fetchButton.addEventListener("click", () => fetchPrior(study, p, item, fetchButton));
    list.append(item);
  }
  box.append(el("strong", {text: "On other archives:"}), list);
}

// Fetching runs as a background retrieve job (202, then GET /api/jobs/<id> about every
// second): its progress and a Cancel button in the item until the job has finished.
const FINISHED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const POLL_MS = 1000;
const POLL_ERRORS = 5;  // consecutive failed polls before giving up on following the job

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function images(n) {
  return n === 1 ? "image" : "images";
}

function fetchProgress(job) {
  if (job.state === "queued") return "Fetching… waiting to start";
  const progress = job.progress || {};
  const done = (progress.completed || 0) + (progress.warning || 0);
  const failed = progress.failed ? `, ${progress.failed} failed` : "";
  if (progress.total !== null && progress.total !== undefined) {
    return `Fetching… ${done} of ${progress.total} ${images(progress.total)}${failed}`;
  }
  return `Fetching… ${done} ${images(done)}${failed}`;
}

// The job's report of the one study (as POST /api/remote-aes/<title>/retrieve gives it).
function fetchReport(job) {
  const studies = (job.result && job.result.studies) || [];
  return studies[0] || null;
}

// Images of the study that reached the archive, also when the fetch did not finish.
function arrivedCount(job) {
  const rep = fetchReport(job);
  return rep ? rep.stored + rep.already_present : ((job.progress || {}).completed || 0);
}

function fetchFailure(job) {
  const arrived = arrivedCount(job);
  const some = arrived ? ` (${arrived} ${images(arrived)} arrived; fetch again for the rest)`
    : "";
  if (job.state === "cancelled") return `The fetch was cancelled${some}.`;
  if (job.state === "interrupted") {
    return `The fetch was interrupted: ${job.error || "the server stopped"}${some}`;
  }
  return `The fetch failed: ${job.error || "the transfer did not complete"}${some}`;
}

async function fetchPrior(study, p, item, button) {
  const label = `Fetch from ${p.remote}`;
  for (const old of item.querySelectorAll(
    "[data-testid=fetch-error], [data-testid=partial-prior-link]")) old.remove();
  const fail = (text) => {
    item.append(el("div", {className: "message error", role: "alert", testid: "fetch-error",
                           text}));
    button.disabled = false;
    button.textContent = label;
  };
  button.disabled = true;
  button.textContent = "Fetching…";
  let job;
  try {
    job = await api.post(
      `/api/studies/${encodeURIComponent(study.study_uid)}/priors/fetch`,
      {remote: p.remote, study_uid: p.study_uid, method: "get", background: true});
  } catch (err) {
    fail(DS.reason(err));
    return;
  }
  const jobPath = `/api/jobs/${encodeURIComponent(job.id)}`;
  const progress = el("span", {className: "muted", testid: "fetch-progress",
                               dataset: {job: String(job.id)}});
  const cancel = el("button", {type: "button", className: "small secondary", text: "Cancel",
                               testid: "cancel-fetch"});
  const running = el("span", {}, progress, " ", cancel);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api.post(`${jobPath}/cancel`);  // the next poll sees the job cancelled
    } catch (err) {
      // 409: it has just finished, and the next poll says how.
      if (!(err instanceof DS.ApiError && err.status === 409)) {
        item.append(el("div", {className: "message error", role: "alert",
                               testid: "fetch-error", text: DS.reason(err)}));
        cancel.disabled = false;
      }
    }
  });
  button.replaceWith(running);  // back in its place if the fetch does not succeed
  let errors = 0;
  while (!FINISHED.has(job.state)) {
    progress.textContent = fetchProgress(job);
    await sleep(POLL_MS);
    if (!item.isConnected) return;  // the list was closed or replaced
    try {
      job = await api.get(jobPath);
      errors = 0;
    } catch (err) {
      errors += 1;
      if (errors >= POLL_ERRORS || (err instanceof DS.ApiError && err.status === 404)) {
        running.replaceWith(button);
        fail(`Cannot follow the fetch (${DS.reason(err)}); it may still finish in the ` +
             "background: look for the prior again later.");
        return;
      }
    }
  }
  if (!item.isConnected) return;
  running.replaceWith(button);
  const rep = fetchReport(job);
  if (job.state !== "succeeded") {
    fail(fetchFailure(job));
    const arrived = arrivedCount(job);
    if (arrived) {  // what did arrive can be compared now; fetching again adds the rest
      const partial = compareLink(study, p);
      partial.dataset.testid = "partial-prior-link";
      partial.textContent = `Compare the ${arrived} ${images(arrived)} that arrived`;
      item.append(partial);
    }
    return;
  }
  if (!rep || !(rep.stored + rep.already_present)) {
    fail((rep && rep.comment) || `nothing arrived (${rep ? rep.outcome : job.state})`);
    return;
  }
  clear(item).append(compareLink(study, p),
                     el("span", {className: "muted", testid: "fetched",
                                 text: ` fetched: ${rep.stored} new image(s)`}));
}

function studyRow(study) {
  const view = el("a", {href: `/app/view/${encodeURIComponent(study.study_uid)}`,
                        text: "View images", testid: "view-study"});
  const compare = el("button", {type: "button", className: "small secondary",
                                text: "Compare with…", testid: "compare-study",
                                "aria-expanded": "false"});
  const row = el("tr", {testid: "timeline-study", dataset: {studyUid: study.study_uid}},
    el("td", {text: dicomDate(study.study_date), testid: "study-date"}),
    el("td", {text: (study.modalities || []).join(", "), testid: "study-modality"}),
    el("td", {text: (study.body_parts || []).join(", ")}),
    el("td", {text: study.description || ""}),
    el("td", {text: (study.organisations || []).join(", "), testid: "study-source"}),
    el("td", {text: status(study)}),
    el("td", {className: "actions"}, view, compare));
  compare.addEventListener("click", () => showPriors(study, row, compare));
  return row;
}

function filterParams() {
  const params = new URLSearchParams();
  const modality = document.getElementById("modality").value;
  const from = document.getElementById("from").value;
  const to = document.getElementById("to").value;
  if (modality) params.set("modality", modality);
  if (from) params.set("from", from);
  if (to) params.set("to", to);
  return params;
}

function addModalities(studies) {
  const select = document.getElementById("modality");
  for (const study of studies) {
    for (const m of study.modalities || []) {
      if (page.modalities.has(m)) continue;
      page.modalities.add(m);
      select.append(el("option", {value: m, text: m}));
    }
  }
}

async function loadTimeline() {
  const query = filterParams().toString();
  const data = await api.get(`/api/patients/${encodeURIComponent(page.ref)}/timeline` +
                             (query ? `?${query}` : ""));
  showPatient(data.patient);
  addModalities(data.studies || []);
  const body = clear(document.getElementById("studies"));
  for (const study of data.studies || []) body.append(studyRow(study));
  document.getElementById("no-studies").hidden = body.children.length > 0;
  const records = clear(document.getElementById("records"));
  for (const rec of data.records || []) {
    const name = personName(rec.patient_name);
    records.append(el("li", {testid: "timeline-record", dataset: {record: rec.id}},
      el("a", {href: `/app/timeline/${encodeURIComponent(rec.id)}`, text: recordLabel(rec)}),
      name ? ` · ${name}` : "", rec.birth_date ? ` · ${dicomDate(rec.birth_date)}` : ""));
  }
  return data;
}

function mayDecide() {
  const me = page.me || {};
  return Boolean(me.superuser) || ["clinician", "admin"].includes(me.role);
}

async function loadProposals(records) {
  const box = document.getElementById("links-box");
  const list = clear(document.getElementById("proposals"));
  const seen = new Set();
  for (const rec of records) {
    const found = await api.get(`/api/patients/links?state=proposed&patient=${
      encodeURIComponent(rec.id)}`);
    for (const link of found || []) {
      if (seen.has(link.id)) continue;
      seen.add(link.id);
      list.append(proposalItem(link));
    }
  }
  box.hidden = list.children.length === 0;
}

function proposalItem(link) {
  const [a, b] = link.records;
  const evidence = link.evidence && link.evidence.rule ? `rule: ${link.evidence.rule}` : "";
  const item = el("li", {testid: "proposal", dataset: {link: String(link.id)}},
    `${recordLabel(a)} ${personName(a.patient_name)} = ${recordLabel(b)} ` +
    `${personName(b.patient_name)}${evidence ? ` (${evidence})` : ""} `);
  if (!mayDecide()) return item;
  const errors = document.getElementById("links-error");
  for (const [decision, label] of [["confirm", "Confirm"], ["reject", "Reject"]]) {
    const button = el("button", {type: "button", className: "small", text: label,
                                 testid: `${decision}-link`});
    DS.action(button, errors, async () => {
      await api.post(`/api/patients/links/${link.id}/${decision}`);
      const data = await loadTimeline();
      await loadProposals(data.records || []);
    });
    item.append(button, " ");
  }
  return item;
}

// /app/timeline without a record: find one (GET /api/patients?patient_id= or ?name=).
function finder() {
  document.getElementById("person").hidden = true;
  document.getElementById("finder").hidden = false;
  const box = document.getElementById("find-error");
  DS.submit(document.getElementById("find"), box, async () => {
    const params = new URLSearchParams();
    const pid = document.getElementById("find-id").value.trim();
    const name = document.getElementById("find-name").value.trim();
    if (pid) params.set("patient_id", pid);
    else if (name) params.set("name", name);
    else throw new Error("Give a patient ID or the start of a name.");
    const found = await api.get(`/api/patients?${params}`);
    const list = clear(document.getElementById("found"));
    for (const rec of found || []) {
      const extra = [personName(rec.patient_name), dicomDate(rec.birth_date), rec.sex]
        .filter(Boolean).join(" · ");
      list.append(el("li", {testid: "found-record", dataset: {record: rec.id}},
        el("a", {href: `/app/timeline/${encodeURIComponent(rec.id)}`,
                 text: recordLabel(rec)}), extra ? ` · ${extra}` : ""));
    }
    if (!list.children.length) say(box, "No patient found.", "info");
  });
}

async function main() {
  page.me = await DS.start();
  page.ref = recordRef();
  if (!page.ref) {
    finder();
    return;
  }
  let data;
  try {
    data = await loadTimeline();
  } catch (err) {
    if (err instanceof DS.ApiError && err.status === 404) {
      throw new Error("This patient does not exist or you may not see their studies.");
    }
    throw err;
  }
  DS.submit(document.getElementById("filters"), document.getElementById("studies-error"),
            async () => { await loadTimeline(); });
  try {
    await loadProposals(data.records || []);
  } catch (err) {
    say(document.getElementById("links-error"), DS.reason(err));
    document.getElementById("links-box").hidden = false;
  }
}

DS.run(main);
