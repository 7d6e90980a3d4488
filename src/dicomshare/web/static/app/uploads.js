// Upload links: create (URL shown once), list, revoke.
"use strict";

const {api, el, clear, when} = DS;

function size(bytes) {
  const n = Number(bytes) || 0;
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(1)} GB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(0)} kB`;
  return `${n} bytes`;
}

async function load() {
  const links = await api.get("/api/upload-links");
  const body = clear(document.getElementById("links"));
  document.getElementById("no-links").hidden = links.length > 0;
  for (const link of links) {
    const actions = el("td");
    if (link.state === "active" || link.state === "full") {
      const revoke = el("button", {type: "button", className: "danger small", text: "Revoke",
                                   testid: "revoke-upload"});
      DS.action(revoke, document.getElementById("list-error"), async () => {
        if (!window.confirm("Revoke this upload link? Nobody can upload through it any more; " +
                            "files already stored stay.")) return;
        await api.del(`/api/upload-links/${Number(link.id)}`);
        await load();
      });
      actions.append(revoke);
    }
    body.append(el("tr", {testid: "upload-link", dataset: {linkId: String(link.id),
                                                           state: link.state}},
      el("td", {text: link.label || "(no label)"}),
      el("td", {}, el("span", {className: `state state-${link.state}`, text: link.state,
                               testid: "upload-state"})),
      el("td", {text: `${size(link.bytes_accepted)} of ${size(link.max_bytes)}`}),
      el("td", {text: String(link.instances_stored)}),
      el("td", {text: when(link.last_used_at) || "never"}),
      el("td", {text: link.revoked_at ? `revoked ${when(link.revoked_at)}`
                                      : when(link.expires_at)}),
      el("td", {text: `${when(link.created_at)}${link.created_by ? " by " + link.created_by : ""}`}),
      actions));
  }
}

DS.run(async () => {
  await DS.start();
  const form = document.getElementById("create");
  const box = document.getElementById("create-error");
  document.getElementById("dismiss").addEventListener("click", () => {
    clear(document.getElementById("new-link-fields"));
    document.getElementById("new-link").hidden = true;
  });
  DS.submit(form, box, async () => {
    const body = {notify: form.notify.checked, expires_in_days: Number(form.days.value || 7)};
    if (form.label.value.trim()) body.label = form.label.value.trim();
    if (form.max_mb.value) body.max_bytes = Math.round(Number(form.max_mb.value) * (1 << 20));
    const link = await api.post("/api/upload-links", body);
    const fields = clear(document.getElementById("new-link-fields"));
    fields.append(DS.secretRow("Upload link for the sender", link.url, "new-upload-url"));
    document.getElementById("new-link").hidden = false;
    form.label.value = "";
    await load();
  });
  await load();
});
