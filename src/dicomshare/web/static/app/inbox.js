// The inbox: received items (accept / decline), sent items (withdraw), sending studies.
"use strict";

const {api, el, clear, when, say} = DS;

function stateCell(item) {
  return el("td", {}, el("span", {className: `state state-${item.state}`, text: item.state,
                                  testid: "item-state"}));
}

function what(item) {
  if (item.study_uid) return el("td", {className: "uid", text: item.study_uid});
  if (item.patient) return el("td", {text: `all studies of patient ${item.patient.id}`});
  return el("td", {className: "muted", text: "shown once accepted"});
}

function button(label, className, testid, box, work) {
  const b = el("button", {type: "button", className: `small ${className}`, text: label,
                          testid});
  DS.action(b, box, work);
  return b;
}

async function loadReceived() {
  const box = document.getElementById("received-error");
  const items = await api.get("/api/inbox");
  const body = clear(document.getElementById("received"));
  document.getElementById("no-received").hidden = items.length > 0;
  for (const item of items) {
    const actions = el("td", {className: "actions"});
    if (item.state === "pending") {
      actions.append(
        button("Accept", "", "accept-item", box, async () => {
          await api.post(`/api/inbox/${Number(item.id)}/accept`);
          await loadReceived();
        }),
        button("Decline", "secondary", "decline-item", box, async () => {
          const reason = window.prompt("Why do you decline? (optional, the sender sees it)");
          if (reason === null) return;
          await api.post(`/api/inbox/${Number(item.id)}/decline`,
                         reason.trim() ? {reason: reason.trim()} : {});
          await loadReceived();
        }));
    }
    body.append(el("tr", {testid: "received-item", dataset: {itemId: String(item.id),
                                                             state: item.state}},
      el("td", {text: when(item.created_at)}),
      el("td", {text: item.from_user ? `${item.from_user} (${item.from_organisation})`
                                     : item.from_organisation}),
      el("td", {text: item.to_user ? `you (${item.to_user})` : item.to_organisation}),
      el("td", {className: "prewrap", text: item.message || ""}),
      el("td", {text: item.permissions.join(", ")}),
      stateCell(item), what(item), actions));
  }
}

async function loadSent() {
  const box = document.getElementById("sent-error");
  const items = await api.get("/api/inbox/sent");
  const body = clear(document.getElementById("sent"));
  document.getElementById("no-sent").hidden = items.length > 0;
  for (const item of items) {
    const actions = el("td");
    if (item.state === "pending") {
      actions.append(button("Withdraw", "secondary", "withdraw-item", box, async () => {
        if (!window.confirm("Withdraw this item? The recipient can no longer accept it.")) {
          return;
        }
        await api.post(`/api/inbox/${Number(item.id)}/withdraw`);
        await loadSent();
      }));
    }
    body.append(el("tr", {testid: "sent-item", dataset: {itemId: String(item.id),
                                                         state: item.state}},
      el("td", {text: when(item.created_at)}),
      el("td", {text: item.to_user ? `${item.to_user} (${item.to_organisation})`
                                   : item.to_organisation}),
      what(item), el("td", {text: item.permissions.join(", ")}), stateCell(item),
      el("td", {text: item.decided_at ? `${when(item.decided_at)}${
        item.decided_by ? " by " + item.decided_by : ""}` : ""}),
      actions));
  }
}

DS.run(async () => {
  const me = await DS.start();
  const sharer = me.role === "clinician" || me.role === "admin";
  document.getElementById("sent-section").hidden = !sharer;
  document.getElementById("send-section").hidden = !sharer;
  if (sharer) {
    const search = DS.studySearch(document.getElementById("search"));
    const form = document.getElementById("send");
    const box = document.getElementById("send-error");
    DS.submit(form, box, async () => {
      const studies = search.required();
      const permissions = [...form.querySelectorAll("input[name=perm]:checked")]
        .map((c) => c.value);
      const base = {to_organisation: form.to_organisation.value.trim(), permissions};
      if (form.to_user.value.trim()) base.to_user = form.to_user.value.trim();
      if (form.message.value.trim()) base.message = form.message.value.trim();
      let sent = 0;
      try {
        for (const uid of studies) {
          await api.post("/api/inbox/sends", {...base, study_uid: uid});
          sent += 1;
        }
        say(box, `Sent ${sent} ${sent === 1 ? "study" : "studies"}.`, "ok");
        search.reset();
        form.message.value = "";
      } catch (err) {
        throw sent ? new Error(`Sent ${sent}, then: ${DS.reason(err)}`) : err;
      } finally {
        await loadSent();
      }
    });
    await loadSent();
  }
  await loadReceived();
});
