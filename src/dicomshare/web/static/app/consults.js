// Consults: the lists (as requester, as specialist) and the request form.
"use strict";

const {api, el, clear, when} = DS;

function short(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

async function fill(role, tbodyId, noneId, party) {
  const consults = await api.get(`/api/consults?role=${role}`);
  const body = clear(document.getElementById(tbodyId));
  document.getElementById(noneId).hidden = consults.length > 0;
  for (const c of consults) {
    const href = `/app/consults/${Number(c.id)}`;
    body.append(el("tr", {testid: "consult", dataset: {consultId: String(c.id),
                                                       state: c.state}},
      el("td", {}, el("a", {href, text: `#${c.id}`, testid: "consult-link"})),
      el("td", {text: c.urgency}),
      el("td", {text: party(c)}),
      el("td", {}, el("a", {href, text: short(c.question, 120)})),
      el("td", {}, el("span", {className: `state state-${c.state}`, text: c.state,
                               testid: "consult-state"})),
      el("td", {text: when(c.created_at)})));
  }
}

function load() {
  return Promise.all([
    fill("specialist", "as-specialist", "none-specialist",
         (c) => c.requester_user ? `${c.requester_user} (${c.requester_organisation})`
                                 : c.requester_organisation),
    fill("requester", "as-requester", "none-requester",
         (c) => c.specialist_user ? `${c.specialist_user} (${c.specialist_organisation})`
                                  : c.specialist_organisation),
  ]);
}

DS.run(async () => {
  const me = await DS.start();
  const sharer = me.role === "clinician" || me.role === "admin";
  document.getElementById("request-section").hidden = !sharer;
  if (sharer) {
    const search = DS.studySearch(document.getElementById("search"));
    const form = document.getElementById("request");
    const box = document.getElementById("request-error");
    DS.submit(form, box, async () => {
      const studies = search.required();
      const body = {studies, question: form.question.value, urgency: form.urgency.value,
                    specialist_organisation: form.specialist_organisation.value.trim()};
      if (form.specialist_user.value.trim()) {
        body.specialist_user = form.specialist_user.value.trim();
      }
      const consult = await api.post("/api/consults", body);
      location.assign(`/app/consults/${Number(consult.id)}`);
      return "leave";
    });
  }
  await load();
});
