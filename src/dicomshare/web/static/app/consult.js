// One consult: state and times, studies, the opinion, the thread, and each party's moves.
"use strict";

const {api, el, clear, when, say} = DS;
const CONCLUSIONS = "121076";
const PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1";
const TIMES = [["created_at", "Requested"], ["accepted_at", "Accepted"],
               ["declined_at", "Declined"], ["answered_at", "Answered"],
               ["closed_at", "Closed"]];
const id = Number((location.pathname.match(/\/app\/consults\/(\d+)/) || [])[1]);
let shownStudies = "";
let shownOpinion = "";

function party(org, user) {
  return user ? `${user} (${org})` : `${org} (any specialist)`;
}

function show(c) {
  const state = document.getElementById("state");
  state.textContent = c.state;
  state.className = `state state-${c.state}`;
  document.querySelector("main h1").textContent = `Consult #${c.id}`;
  document.getElementById("urgency").textContent = c.urgency;
  document.getElementById("requester").textContent =
    c.requester_user ? `${c.requester_user} (${c.requester_organisation})`
                     : c.requester_organisation;
  document.getElementById("specialist").textContent =
    party(c.specialist_organisation, c.specialist_user);
  document.getElementById("question").textContent = c.question;
  const declined = Boolean(c.decline_reason);
  document.getElementById("decline-label").hidden = !declined;
  const reasonBox = document.getElementById("decline-reason");
  reasonBox.hidden = !declined;
  reasonBox.textContent = c.decline_reason || "";
  const times = clear(document.getElementById("times"));
  for (const [key, label] of TIMES) {
    if (c[key]) {
      times.append(el("dt", {text: label}),
                   el("dd", {text: when(c[key]), testid: `time-${key}`}));
    }
  }
  actions(c);
}

function actions(c) {
  const box = document.getElementById("action-error");
  const bar = clear(document.getElementById("actions"));
  const specialist = c.role === "specialist";
  const requester = c.role === "requester";
  const add = (label, className, testid, work) => {
    const b = el("button", {type: "button", className, text: label, testid});
    DS.action(b, box, work);
    bar.append(b);
  };
  if (specialist && c.state === "requested") {
    add("Accept", "", "consult-accept", async () => {
      await api.post(`/api/consults/${id}/accept`);
      await load();
    });
  }
  if (specialist && (c.state === "requested" || c.state === "accepted")) {
    add("Decline…", "secondary", "consult-decline", async () => {
      document.getElementById("decline-form").hidden = false;
    });
  } else {
    document.getElementById("decline-form").hidden = true;
  }
  if (requester && ["requested", "accepted", "answered", "declined"].includes(c.state)) {
    add("Close the consult", "secondary", "consult-close", async () => {
      if (!window.confirm("Close this consult? The specialist's access to the studies " +
                          "ends and the thread is closed.")) return;
      await api.post(`/api/consults/${id}/close`);
      await load();
    });
  }
  document.getElementById("answer-section").hidden = !(specialist && c.state === "accepted");
  const open = ["requested", "accepted", "answered"].includes(c.state);
  document.getElementById("comment").hidden = !open;
}

async function studies(c) {
  const key = JSON.stringify([c.studies, c.opinion]);
  if (key === shownStudies) return;
  shownStudies = key;
  const body = clear(document.getElementById("studies"));
  const select = clear(document.querySelector("#answer select[name=study]"));
  document.getElementById("answer-study-label").hidden = c.studies.length < 2;
  for (const uid of c.studies) {
    let study = null;
    try {
      study = await DS.studySummary(uid);
    } catch (err) {
      study = null;
    }
    const hasOpinion = Boolean(c.opinion && c.opinion.study_uid === uid);
    const cells = study
      ? [study.patientName, study.patientId, study.date, study.description,
         study.modalities, study.instances]
      : ["", "", "", `not visible to you (${uid})`, "", ""];
    const view = study
      ? el("a", {href: `/app/view/${encodeURIComponent(uid)}`, target: "_blank",
                 rel: "noopener", text: "View images", testid: "view-study"})
      : "";
    body.append(el("tr", {testid: "consult-study", dataset: {studyUid: uid}},
      ...cells.map((text) => el("td", {text})),
      el("td", {text: hasOpinion ? "opinion stored here" : "", testid: "study-opinion"}),
      el("td", {}, view)));
    const label = study ? `${study.date} ${study.description || study.modalities}`.trim()
      : uid;
    select.append(el("option", {value: uid, text: label || uid}));
  }
}

function texts(items, out) {
  for (const item of items || []) {
    const code = (((item["0040A043"] || {}).Value || [])[0] || {})["00080100"];
    const text = (item["0040A160"] || {}).Value;
    if (code && code.Value && code.Value[0] === CONCLUSIONS && text) out.push(...text);
    texts((item["0040A730"] || {}).Value, out);
  }
  return out;
}

async function opinion(c) {
  const section = document.getElementById("opinion-section");
  section.hidden = !c.opinion;
  if (!c.opinion) return;
  const key = c.opinion.sop_instance_uid;
  if (key === shownOpinion) return;
  shownOpinion = key;
  const box = clear(document.getElementById("opinion"));
  const by = c.specialist_user || c.specialist_organisation;
  box.append(el("p", {className: "muted",
                      text: `Answered ${when(c.answered_at)} by ${by}.`}));
  try {
    const found = await DS.qido(`/studies/${encodeURIComponent(c.opinion.study_uid)}/instances`,
                                {SOPInstanceUID: key});
    if (!found.length) throw new Error("the report is not visible to you");
    const series = DS.value(found[0], "0020000E");
    const sopClass = DS.value(found[0], "00080016");
    if (sopClass === PDF_CLASS) {
      box.append(el("p", {text: "The opinion is stored in the study as an Encapsulated PDF " +
                               "report; open it in your viewer or workstation."}));
      return;
    }
    const root = (await DS.settings()).dicomweb_root;
    const meta = await api.raw("GET", `${root}/studies/${encodeURIComponent(
      c.opinion.study_uid)}/series/${encodeURIComponent(series)}/instances/${
      encodeURIComponent(key)}/metadata`, undefined, "application/dicom+json");
    const lines = texts([meta[0]], []);
    box.append(el("p", {className: "prewrap", testid: "opinion-body",
                        text: lines.join("\n\n") || "(the report has no conclusions)"}));
  } catch (err) {
    shownOpinion = "";
    box.append(el("p", {className: "muted",
                        text: `The report could not be read: ${DS.reason(err)}`}));
  }
}

async function comments() {
  const list = await api.get(`/api/consults/${id}/comments`);
  const ul = clear(document.getElementById("comments"));
  document.getElementById("no-comments").hidden = list.length > 0;
  for (const c of list) {
    ul.append(el("li", {testid: "comment"},
      el("div", {className: "meta",
                 text: `${c.author || "(deleted user)"} (${c.organisation}), ${
                   when(c.created_at)}`}),
      el("div", {className: "prewrap", text: c.body, testid: "comment-body"})));
  }
}

async function load() {
  const c = await api.get(`/api/consults/${id}`);
  show(c);
  await Promise.all([studies(c), opinion(c), comments()]);
  return c;
}

DS.run(async () => {
  await DS.start();
  if (!id) throw new Error("no consult number in the address");
  document.getElementById("comment").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const box = document.getElementById("comment-error");
    say(box, "");
    try {
      await api.post(`/api/consults/${id}/comments`, {body: form.body.value});
      form.body.value = "";
      await load();
    } catch (err) {
      say(box, DS.reason(err));
    }
  });
  document.getElementById("decline-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const reason = event.target.reason.value.trim();
    const box = document.getElementById("action-error");
    try {
      await api.post(`/api/consults/${id}/decline`, reason ? {reason} : {});
      event.target.reason.value = "";
      await load();
    } catch (err) {
      say(box, DS.reason(err));
    }
  });
  const answer = document.getElementById("answer");
  DS.submit(answer, document.getElementById("answer-error"), async () => {
    const body = {text: answer.text.value, format: answer.format.value};
    if (answer.study.value) body.study_uid = answer.study.value;
    await api.post(`/api/consults/${id}/opinion`, body);
    answer.text.value = "";
    await load();
  });
  await load();
});
