// The upload page of an upload link (docs/upload-links.md). Each file is declared
// (POST .../files), sent in chunks (PATCH with Upload-Offset) and, after a network error,
// resumed from what the server holds (HEAD). Upload ids are kept in localStorage, so a
// reloaded page resumes a file instead of starting again.
(function () {
  "use strict";

  const parts = location.pathname.split("/").filter(Boolean);
  const secret = parts[0] === "upload" && parts[1] ? parts[1] : "";
  const base = "/upload/" + encodeURIComponent(secret);
  const PARALLEL = 3;
  const MAX_RETRIES = 10;
  let chunkSize = 4 * 1024 * 1024;

  const $ = (id) => document.getElementById(id);
  const queue = [];
  const items = [];
  let running = 0;
  let usable = false;
  const totals = { stored: 0, duplicate: 0, rejected: 0, skipped: 0 };

  class Fatal extends Error {}

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
  }

  function formatBytes(n) {
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function reason(response) {
    try {
      const body = await response.json();
      return body.error || response.statusText;
    } catch (e) {
      return response.statusText || "HTTP " + response.status;
    }
  }

  // -- the link -----------------------------------------------------------------------
  async function loadInfo() {
    let response;
    try {
      response = await fetch(base + "/info", { cache: "no-store" });
    } catch (e) {
      showError("The server cannot be reached. Check your connection and reload the page.");
      return;
    }
    if (!response.ok) {
      showError(await reason(response));
      $("drop").classList.add("disabled");
      return;
    }
    const info = await response.json();
    chunkSize = info.chunk_size || chunkSize;
    usable = info.state === "active";
    const who = info.label ? info.label + " (" + info.organisation + ")" : info.organisation;
    $("info").textContent = "Images sent here go to " + who + ". Up to " +
      formatBytes(info.bytes_left) + " more can be sent until " +
      new Date(info.expires_at).toLocaleString() + ".";
    if (!usable) {
      $("drop").classList.add("disabled");
      showError("This link accepts no more files (" + info.state + ").");
    }
  }

  // -- choosing files -----------------------------------------------------------------
  function addFiles(entries) {
    if (!entries.length) return;
    $("progress").hidden = false;
    $("summary").hidden = true;
    for (const entry of entries) {
      const item = { file: entry.file, name: entry.name, size: entry.file.size, sent: 0,
                     id: null, row: makeRow(entry.name, entry.file.size) };
      items.push(item);
      if (item.size === 0) {
        finishItem(item, "rejected", [{ name: item.name, outcome: "rejected",
                                        reason: "the file is empty" }]);
        continue;
      }
      queue.push(item);
    }
    updateTotal();
    pump();
    if (running === 0 && queue.length === 0) batchDone();
  }

  function makeRow(name, size) {
    const li = document.createElement("li");
    li.dataset.testid = "file-row";
    li.dataset.name = name;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name + " (" + formatBytes(size) + ")";
    label.title = name;
    const bar = document.createElement("progress");
    bar.max = Math.max(size, 1);
    bar.value = 0;
    bar.dataset.testid = "file-progress";
    const status = document.createElement("span");
    status.className = "status";
    status.dataset.testid = "file-status";
    status.textContent = "waiting";
    li.append(label, bar, status);
    $("list").append(li);
    return { li: li, bar: bar, status: status };
  }

  function fromInput(input) {
    const chosen = Array.from(input.files || []).map((file) => ({
      file: file, name: file.webkitRelativePath || file.name }));
    input.value = "";
    addFiles(chosen);
  }

  function readAll(reader) {
    return new Promise((resolve, reject) => {
      const out = [];
      const more = () => reader.readEntries((batch) => {
        if (!batch.length) { resolve(out); return; }
        out.push(...batch);
        more();
      }, reject);
      more();
    });
  }

  async function walk(entry, out) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ file: file, name: entry.fullPath.replace(/^\//, "") });
    } else if (entry.isDirectory) {
      for (const child of await readAll(entry.createReader())) await walk(child, out);
    }
  }

  async function fromDrop(dataTransfer) {
    const out = [];
    const entries = Array.from(dataTransfer.items || [])
      .map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    if (entries.length && entries.every((e) => e)) {
      for (const entry of entries) await walk(entry, out);
    } else {
      for (const file of Array.from(dataTransfer.files || [])) out.push({ file: file, name: file.name });
    }
    addFiles(out);
  }

  // -- sending ------------------------------------------------------------------------
  function pump() {
    while (running < PARALLEL && queue.length) {
      const item = queue.shift();
      running += 1;
      send(item).catch((e) => {
        finishItem(item, "failed", [{ name: item.name, outcome: "rejected",
                                      reason: e.message || String(e) }]);
      }).finally(() => {
        running -= 1;
        pump();
        if (running === 0 && queue.length === 0) batchDone();
      });
    }
  }

  function storageKey(item) {
    return "dicomshare-upload:" + secret + ":" + item.name + ":" + item.size + ":" +
      item.file.lastModified;
  }

  async function begin(item) {
    const known = localStorage.getItem(storageKey(item));
    if (known) {
      const response = await fetch(base + "/files/" + known, { cache: "no-store" });
      if (response.ok) {
        const state = await response.json();
        if (state.state === "receiving") { item.id = known; return state.offset; }
      }
      localStorage.removeItem(storageKey(item));
    }
    const response = await fetch(base + "/files", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: item.name, size: item.size }) });
    if (!response.ok) throw new Fatal(await reason(response));
    const created = await response.json();
    item.id = created.upload_id;
    localStorage.setItem(storageKey(item), item.id);
    return 0;
  }

  async function serverOffset(item) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const response = await fetch(base + "/files/" + item.id, { method: "HEAD", cache: "no-store" });
        if (response.ok) return parseInt(response.headers.get("Upload-Offset"), 10);
        if (response.status < 500 && response.status !== 429) {
          throw new Fatal("the server no longer accepts this file (" + response.status + ")");
        }
      } catch (e) {
        if (e instanceof Fatal || attempt >= MAX_RETRIES) throw e;
      }
      await sleep(Math.min(30000, 1000 * 2 ** attempt));
    }
  }

  function patch(item, offset, blob) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PATCH", base + "/files/" + item.id);
      xhr.setRequestHeader("Content-Type", "application/offset+octet-stream");
      xhr.setRequestHeader("Upload-Offset", String(offset));
      xhr.upload.onprogress = (e) => { setSent(item, offset + e.loaded); };
      xhr.onerror = () => reject(new Error("network error"));
      xhr.ontimeout = () => reject(new Error("timed out"));
      xhr.onload = () => {
        const header = parseInt(xhr.getResponseHeader("Upload-Offset"), 10);
        if (xhr.status === 204) { resolve(header); return; }
        if (xhr.status === 409 && !Number.isNaN(header)) {
          // Not where the server is: continue from its offset (after a short pause when
          // another transfer of the file is still being finished).
          sleep(500).then(() => resolve(header));
          return;
        }
        let message = "HTTP " + xhr.status;
        try { message = JSON.parse(xhr.responseText).error || message; } catch (e) { /* */ }
        if (xhr.status >= 500 || xhr.status === 429) reject(new Error(message));
        else reject(new Fatal(message));
      };
      xhr.send(blob);
    });
  }

  async function send(item) {
    item.row.status.textContent = "starting";
    let offset = await begin(item);
    let failures = 0;
    item.row.status.textContent = "sending";
    while (offset < item.size) {
      const end = Math.min(offset + chunkSize, item.size);
      try {
        offset = await patch(item, offset, item.file.slice(offset, end));
        failures = 0;
      } catch (e) {
        if (e instanceof Fatal) throw e;
        failures += 1;
        if (failures > MAX_RETRIES) throw new Error("gave up after repeated errors: " + e.message);
        item.row.status.textContent = "retrying";
        await sleep(Math.min(30000, 1000 * 2 ** (failures - 1)));
        offset = await serverOffset(item);
        item.row.status.textContent = "sending";
      }
      setSent(item, offset);
    }
    item.row.status.textContent = "checking";
    const state = await finalState(item);
    localStorage.removeItem(storageKey(item));
    const has = (what) => state.results.some((r) => r.outcome === what);
    const outcome = has("stored") ? "stored" : has("duplicate") ? "duplicate" : "rejected";
    finishItem(item, outcome, state.results);
  }

  async function finalState(item) {
    for (let attempt = 0; attempt < 600; attempt += 1) {
      const response = await fetch(base + "/files/" + item.id, { cache: "no-store" });
      if (!response.ok) throw new Fatal(await reason(response));
      const state = await response.json();
      if (state.state !== "receiving" && state.state !== "processing") return state;
      await sleep(1000);
    }
    throw new Error("the server did not finish with this file");
  }

  function setSent(item, sent) {
    item.sent = Math.min(sent, item.size);
    item.row.bar.value = item.sent;
    updateTotal();
  }

  function updateTotal() {
    const size = items.reduce((n, i) => n + i.size, 0);
    const sent = items.reduce((n, i) => n + i.sent, 0);
    $("total").max = Math.max(size, 1);
    $("total").value = sent;
    $("total-text").textContent = formatBytes(sent) + " of " + formatBytes(size);
  }

  function finishItem(item, outcome, results) {
    item.sent = item.size;
    item.row.bar.value = item.row.bar.max;
    const counts = { stored: 0, duplicate: 0, rejected: 0, skipped: 0 };
    for (const r of results) {
      counts[r.outcome] = (counts[r.outcome] || 0) + 1;
      totals[r.outcome] = (totals[r.outcome] || 0) + 1;
      if (r.outcome === "rejected") {
        const li = document.createElement("li");
        li.dataset.testid = "rejected-item";
        li.append(document.createTextNode(r.name + ": "));
        const why = document.createElement("span");
        why.className = "reason";
        why.textContent = r.reason || "rejected";
        li.append(why);
        $("rejected").append(li);
      }
    }
    const status = item.row.status;
    status.className = "status " + outcome;
    item.row.li.dataset.outcome = outcome;
    if (results.length > 1) {
      status.textContent = counts.stored + " stored, " + counts.duplicate + " dup., " +
        counts.rejected + " rejected";
    } else {
      status.textContent = outcome === "duplicate" ? "already there" : outcome;
    }
    updateTotal();
  }

  async function batchDone() {
    try {
      await fetch(base + "/done", { method: "POST" });
    } catch (e) { /* the recipient is told at the next batch */ }
    $("n-stored").textContent = totals.stored;
    $("n-duplicate").textContent = totals.duplicate;
    $("n-rejected").textContent = totals.rejected;
    $("summary").hidden = false;
  }

  // -- wiring -------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    if (!secret) { showError("This page must be opened through an upload link."); return; }
    loadInfo();
    $("files").addEventListener("change", (e) => fromInput(e.target));
    $("folder").addEventListener("change", (e) => fromInput(e.target));
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      fromDrop(e.dataTransfer).catch((err) => showError("Could not read what was dropped: " + err));
    });
    window.addEventListener("beforeunload", (e) => {
      if (running || queue.length) { e.preventDefault(); e.returnValue = ""; }
    });
  });
})();
