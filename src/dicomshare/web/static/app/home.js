// Home: the notifications (unread count, mark read) and the sections.
"use strict";

const {api, el, clear, when, say} = DS;

function target(note) {
  const details = note.details || {};
  if (details.consult_id) return `/app/consults/${Number(details.consult_id)}`;
  if (details.inbox_id) return "/app/inbox";
  if (note.kind === "share-used") return "/app/links";
  if (note.kind === "upload-received") return "/app/uploads";
  return null;
}

async function load() {
  const box = document.getElementById("notes-error");
  const onlyUnread = document.getElementById("only-unread").checked;
  const notes = await api.get(`/api/notifications?limit=200${onlyUnread ? "&unread=true" : ""}`);
  const unread = onlyUnread ? notes.length
    : (await api.get("/api/notifications?unread=true&limit=1000")).length;
  document.getElementById("unread").textContent = String(unread);
  const body = clear(document.getElementById("notes"));
  document.getElementById("no-notes").hidden = notes.length > 0;
  for (const note of notes) {
    const href = target(note);
    const subject = href ? el("a", {href, text: note.subject}) : note.subject;
    const read = el("button", {type: "button", className: "secondary small",
                               text: "Mark read", testid: "mark-read"});
    read.addEventListener("click", async () => {
      read.disabled = true;
      try {
        await api.post(`/api/notifications/${Number(note.id)}/read`);
        await load();
      } catch (err) {
        say(box, DS.reason(err));
        read.disabled = false;
      }
    });
    body.append(el("tr", {className: note.read ? "" : "unread", testid: "notification",
                          dataset: {kind: note.kind, read: String(note.read)}},
      el("td", {text: when(note.created_at)}), el("td", {}, subject),
      el("td", {text: note.for_organisation ? "organisation" : "you"}),
      el("td", {}, note.read ? "" : read)));
  }
}

DS.run(async () => {
  await DS.start();
  document.getElementById("only-unread").addEventListener("change", () => load());
  DS.action(document.getElementById("read-all"), document.getElementById("notes-error"),
    async () => {
      const unread = await api.get("/api/notifications?unread=true&limit=1000");
      for (const note of unread) await api.post(`/api/notifications/${Number(note.id)}/read`);
      await load();
    });
  await load();
});
