// Share links: find studies, create a link (its URL and secret shown once), list, revoke.
"use strict";

const {api, el, clear, when} = DS;

function showNew(link) {
  const fields = clear(document.getElementById("new-link-fields"));
  fields.append(
    DS.secretRow("Link for the recipient", link.url, "new-link-url"),
    DS.secretRow("DICOMweb root (for a workstation or OHIF)", link.dicomweb_url,
                 "new-link-dicomweb"),
    DS.secretRow("Secret", link.secret, "new-link-secret"));
  const box = document.getElementById("new-link");
  box.hidden = false;
  box.scrollIntoView({block: "nearest"});
}

function hideNew() {
  clear(document.getElementById("new-link-fields"));
  document.getElementById("new-link").hidden = true;
}

async function load() {
  const links = await api.get("/api/links");
  const body = clear(document.getElementById("links"));
  document.getElementById("no-links").hidden = links.length > 0;
  for (const link of links) body.append(row(link));
}

function row(link) {
  const studies = link.patient ? `all of patient ${link.patient.id}`
    : `${link.studies.length} ${link.studies.length === 1 ? "study" : "studies"}`;
  const uses = link.max_uses ? `${link.uses} of ${link.max_uses}` : String(link.uses);
  const cells = [
    el("td", {text: link.label || "(no label)", testid: "link-row-label"}),
    el("td", {text: studies, title: link.studies.join("\n")}),
    el("td", {text: link.permissions.join(", ") + (link.has_pin ? " · PIN" : "")}),
    el("td", {}, el("span", {className: `state state-${link.state}`, text: link.state,
                             testid: "link-state"})),
    el("td", {text: uses, testid: "link-uses"}),
    el("td", {text: when(link.last_used_at) || "never"}),
    el("td", {text: link.revoked_at ? `revoked ${when(link.revoked_at)}`
                                    : when(link.expires_at)}),
    el("td", {text: `${when(link.created_at)}${link.created_by ? " by " + link.created_by : ""}`}),
  ];
  const actions = el("td");
  if (link.state === "active" || link.state === "locked" || link.state === "exhausted") {
    const revoke = el("button", {type: "button", className: "danger small", text: "Revoke",
                                 testid: "revoke-link"});
    DS.action(revoke, document.getElementById("list-error"), async () => {
      const name = link.label ? `"${link.label}"` : `#${link.id}`;
      if (!window.confirm(`Revoke the link ${name}? Whoever has it loses access at once.`)) {
        return;
      }
      await api.del(`/api/links/${Number(link.id)}`);
      await load();
    });
    actions.append(revoke);
  }
  return el("tr", {testid: "link", dataset: {linkId: String(link.id), state: link.state}},
            ...cells, actions);
}

DS.run(async () => {
  await DS.start();
  const search = DS.studySearch(document.getElementById("search"));
  const form = document.getElementById("create");
  const box = document.getElementById("create-error");
  document.getElementById("dismiss").addEventListener("click", hideNew);
  DS.submit(form, box, async () => {
    const studies = search.required();
    const permissions = [...form.querySelectorAll("input[name=perm]:checked")]
      .map((c) => c.value);
    const body = {studies, permissions, notify: form.notify.checked};
    if (form.label.value.trim()) body.label = form.label.value.trim();
    if (form.days.value) body.expires_in_days = Number(form.days.value);
    if (form.pin.value) body.pin = form.pin.value;
    if (form.max_uses.value) body.max_uses = Number(form.max_uses.value);
    const link = await api.post("/api/links", body);
    showNew(link);
    form.pin.value = "";
    form.label.value = "";
    search.reset();
    await load();
  });
  await load();
});
