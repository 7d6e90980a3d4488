// The side-by-side comparison: the current study (left) and a chosen prior (right), each
// in the signed-in viewer (/app/view/<uid>, a same-origin frame with its series list).
// Each viewer tells this page where its stack is (postMessage); with sync on, scrolling
// one moves the other to the same relative position. Text only.
"use strict";

function studies() {
  // /app/compare/<study>/<prior>
  const parts = location.pathname.split("/").filter(Boolean);
  return [decodeURIComponent(parts[2] || ""), decodeURIComponent(parts[3] || "")];
}

function viewerUrl(uid) {
  return `/app/view/${encodeURIComponent(uid)}`;
}

async function title(uid, node) {
  try {
    const s = await DS.studySummary(uid);
    node.textContent = s
      ? [s.date, s.modalities, s.description].filter(Boolean).join(" · ") || uid
      : "not found, or not visible to you";
  } catch (err) {
    node.textContent = DS.reason(err);
  }
}

async function main() {
  await DS.start();
  const [study, prior] = studies();
  const left = document.getElementById("left");
  const right = document.getElementById("right");
  const sync = document.getElementById("sync");
  const patient = new URLSearchParams(location.search).get("patient");
  if (patient) {
    const back = document.getElementById("back");
    back.href = `/app/timeline/${encodeURIComponent(patient)}`;
    back.hidden = false;
  }
  // Each frame's last known stack: {index, count} (count 0: no series open).
  const frames = [
    {frame: left, position: document.getElementById("left-position"), index: 0, count: 0},
    {frame: right, position: document.getElementById("right-position"), index: 0, count: 0},
  ];
  const go = (target, fraction) => target.frame.contentWindow.postMessage(
    {type: "dicomshare-viewer-go", fraction}, location.origin);
  const fractionOf = (f) => (f.count > 1 ? f.index / (f.count - 1) : 0);
  window.addEventListener("message", (event) => {
    if (event.origin !== location.origin) return;
    const data = event.data || {};
    if (data.type !== "dicomshare-viewer-position") return;
    const from = frames.find((f) => f.frame.contentWindow === event.source);
    if (!from) return;
    const count = Math.max(0, Number(data.count) || 0);
    const index = Math.max(0, Number(data.index) || 0);
    const opened = count !== from.count; // a series was (re)opened in that frame
    Object.assign(from, {index, count});
    from.position.textContent = count ? `${index + 1} / ${count}` : "";
    if (!sync.checked || data.synced || !count) return;
    const other = frames.find((f) => f !== from);
    if (!other.count) return;
    // A series just opened joins the other stack's position; a scroll moves the other.
    if (opened) go(from, fractionOf(other));
    else go(other, fractionOf(from));
  });
  left.src = viewerUrl(study);
  right.src = viewerUrl(prior);
  document.title = "Compare · dicomshare";
  await Promise.all([title(study, document.getElementById("left-title")),
                     title(prior, document.getElementById("right-title"))]);
}

DS.run(main);
