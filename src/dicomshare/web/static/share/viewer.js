/* Share-link landing page and image viewer.
 *
 * Plain JavaScript, no build step and nothing from a CDN. Images are rendered by the
 * server (JPEG) so that the page works on a slow connection: the browser never decodes
 * DICOM. Everything the server says (names, descriptions) is put in the page as text,
 * never as HTML: DICOM attributes come from whoever made the study.
 *
 * The link's base is the page's own path (/share/<secret>); its info.json lists the
 * studies, and its DICOMweb root lists and renders the images.
 */
"use strict";

(() => {
  const PREFETCH = [1, 2, 3, -1, -2]; // neighbours fetched ahead, in scrolling direction
  const CACHE_MAX = 32; // prefetched images kept (and so kept in the browser's cache)
  const MAX_SIDE = 1024; // larger images are asked for at most this size
  const DRAFT_QUALITY = 60; // while dragging the window: smaller images, faster answers
  const STALL_MS = 8000; // a request still loading after this may be replaced
  const ZOOM_MIN = 0.25;
  const ZOOM_MAX = 16;
  const TAG = {
    instanceNumber: "00200013",
    sop: "00080018",
    rows: "00280010",
    columns: "00280011",
    frames: "00280008",
    center: "00281050",
    width: "00281051",
    bitsStored: "00280101",
    modality: "00080060",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    label: $("label"), expiry: $("expiry"), download: $("download"), status: $("status"),
    studies: $("study-list"), viewer: $("viewer"), title: $("viewer-heading"),
    close: $("close"), preset: $("preset"), wlValue: $("wl-value"),
    modePan: $("mode-pan"), modeWindow: $("mode-window"), zoomIn: $("zoom-in"),
    zoomOut: $("zoom-out"), zoomReset: $("zoom-reset"), stage: $("stage"), image: $("image"),
    stageMessage: $("stage-message"), prev: $("prev"), next: $("next"), slider: $("slider"),
    position: $("position"),
  };

  const state = {
    base: linkBase(location.pathname),
    root: "",
    series: null, // {study, series, button}
    images: [], // {url, sop, frame, rows, cols, modality, instanceUrl}
    index: 0,
    direction: 1,
    window: null, // [center, width], null: the file's own
    fileWindows: new Map(), // instance URL -> Promise<[center, width]>
    zoom: 1, panX: 0, panY: 0,
    mode: "pan",
    drag: null,
    wanted: "",
    loadingSince: 0,
    cache: new Map(),
    generation: 0, // bumped when a series opens: late answers for the last one are dropped
    wheel: 0,
    syncing: false, // moving on the framing page's word (see tellParent)
  };

  // -- helpers ----------------------------------------------------------------------------
  function linkBase(path) {
    const match = path.match(/^(.*?\/share\/[^/]+)/);
    return match ? match[1] : path.replace(/\/+$/, "");
  }

  function node(tag, attrs = {}, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") n.textContent = v;
      else if (k === "className") n.className = v;
      else n.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c) n.append(c);
    return n;
  }

  async function failure(response) {
    try {
      const body = await response.json();
      const reason = body.error || body.detail;
      if (reason) return typeof reason === "string" ? reason : JSON.stringify(reason);
    } catch (_) { /* not JSON */ }
    return `${response.status} ${response.statusText}`.trim();
  }

  async function getJSON(url, accept = "application/json") {
    const response = await fetch(url, { headers: { Accept: accept }, credentials: "same-origin" });
    if (!response.ok) {
      const err = new Error(await failure(response));
      err.status = response.status;
      throw err;
    }
    if (response.status === 204) return [];
    return response.json();
  }

  function setStatus(text, isError = false) {
    el.status.textContent = text;
    el.status.hidden = !text;
    el.status.classList.toggle("error", isError);
    el.status.setAttribute("role", isError ? "alert" : "status");
  }

  function value(ds, tag) {
    const v = ds && ds[tag] && ds[tag].Value;
    return v && v.length ? v[0] : undefined;
  }

  function formatDate(text) {
    if (!text) return "";
    const m = /^(\d{4})(\d{2})(\d{2})$/.exec(text);
    return m ? `${m[1]}-${m[2]}-${m[3]}` : text;
  }

  function formatName(name) {
    if (!name) return "";
    if (typeof name === "object") name = name.Alphabetic || "";
    const [family = "", given = "", middle = "", prefix = "", suffix = ""] = name.split("^");
    const first = [prefix, given, middle].filter(Boolean).join(" ");
    return [family, first].filter(Boolean).join(", ") + (suffix ? ` ${suffix}` : "");
  }

  function formatExpiry(text) {
    if (!text) return "This link does not expire.";
    const when = new Date(text);
    if (Number.isNaN(when.getTime())) return `Available until ${text}.`;
    return `Available until ${when.toLocaleString(undefined,
      { dateStyle: "medium", timeStyle: "short" })}.`;
  }

  function round(x) {
    return Math.round(x * 10) / 10;
  }

  // -- the landing page -------------------------------------------------------------------
  async function start() {
    let info;
    try {
      info = await getJSON(`${state.base}/info.json`);
    } catch (err) {
      setStatus(err.status === 401
        ? "The viewing session has ended. Reload the page to enter the PIN again."
        : `This share link cannot be opened: ${err.message}`, true);
      return;
    }
    state.root = info.dicomweb_root || `${state.base}/dicomweb`;
    const label = info.label || "Shared images";
    el.label.textContent = label;
    document.title = `${label} · shared images`;
    el.expiry.textContent = formatExpiry(info.expires_at);
    if (info.download_url) {
      el.download.href = info.download_url;
      el.download.hidden = false;
    }
    const studies = info.studies || [];
    if (!studies.length) {
      setStatus("This link covers no studies.", true);
      return;
    }
    setStatus("");
    for (const study of studies) el.studies.append(studyItem(study));
  }

  function studyItem(study) {
    const facts = node("dl", { className: "facts" });
    const fact = (term, text) => {
      if (text) facts.append(node("dt", { text: term }), node("dd", { text }));
    };
    fact("Date", formatDate(study.study_date));
    fact("Patient", formatName(study.patient_name));
    fact("Patient ID", study.patient_id);
    fact("Modalities", (study.modalities || []).join(", "));
    const list = node("ul", { className: "series-list", "aria-label": "Series" });
    const series = [...(study.series || [])].sort(
      (a, b) => (a.series_number ?? 1e9) - (b.series_number ?? 1e9));
    for (const s of series) list.append(node("li", {}, seriesButton(study, s)));
    return node("li", { className: "study", "data-testid": "study",
                        "data-study-uid": study.study_uid },
      node("h3", { text: study.study_description || "Study without description" }),
      facts, list);
  }

  function seriesName(s) {
    const parts = [];
    if (s.series_number !== null && s.series_number !== undefined) {
      parts.push(`#${s.series_number}`);
    }
    if (s.modality) parts.push(s.modality);
    parts.push(s.series_description || "series");
    return parts.join(" ");
  }

  function seriesButton(study, s) {
    const count = s.instances === 1 ? "1 image" : `${s.instances ?? "?"} images`;
    const img = node("img", { src: s.thumbnail_url, alt: "", width: 96, height: 96,
                              decoding: "async", "data-testid": "thumbnail-image" });
    img.addEventListener("error", () => img.classList.add("broken"));
    const button = node("button", {
      type: "button", className: "series", "data-testid": "series-thumbnail",
      "data-series-uid": s.series_uid, "aria-label": `Open series ${seriesName(s)}, ${count}`,
    }, img, node("span", { className: "caption", text: seriesName(s) }),
    node("span", { className: "muted small", text: count }));
    button.addEventListener("click", () => openSeries(study, s, button));
    return button;
  }

  // -- the stack viewer -------------------------------------------------------------------
  async function openSeries(study, series, button) {
    const generation = ++state.generation;
    if (state.series) state.series.button.removeAttribute("aria-current");
    button.setAttribute("aria-current", "true");
    state.series = { study, series, button };
    state.images = [];
    state.index = 0;
    state.window = null;
    setPreset("");
    resetView();
    el.viewer.hidden = false;
    el.title.textContent = `${seriesName(series)} · ${study.study_description || "study"}`;
    el.image.removeAttribute("src");
    state.wanted = "";
    state.loadingSince = 0;
    updatePosition();
    message("Loading the series…");
    const seriesUrl = `${state.root}/studies/${encodeURIComponent(study.study_uid)}` +
      `/series/${encodeURIComponent(series.series_uid)}`;
    let found;
    try {
      found = await getJSON(`${seriesUrl}/instances`, "application/dicom+json");
    } catch (err) {
      if (generation === state.generation) message(`The series cannot be listed: ${err.message}`);
      return;
    }
    if (generation !== state.generation) return;
    state.images = imagesOf(found, seriesUrl, series.modality);
    if (!state.images.length) {
      message("This series has no images to show (it may hold a report or other data).");
      return;
    }
    message("");
    el.slider.max = String(state.images.length);
    el.slider.disabled = state.images.length < 2;
    if (window.matchMedia("(max-width: 800px)").matches) el.viewer.scrollIntoView();
    el.stage.focus({ preventScroll: true });
    show();
  }

  function imagesOf(found, seriesUrl, modality) {
    const rows = found.filter((ds) => value(ds, TAG.rows) && value(ds, TAG.sop));
    rows.sort((a, b) => (value(a, TAG.instanceNumber) ?? 1e12) -
      (value(b, TAG.instanceNumber) ?? 1e12) ||
      String(value(a, TAG.sop)).localeCompare(String(value(b, TAG.sop))));
    const images = [];
    for (const ds of rows) {
      const sop = value(ds, TAG.sop);
      const instanceUrl = `${seriesUrl}/instances/${encodeURIComponent(sop)}`;
      const frames = Math.max(1, Number(value(ds, TAG.frames) || 1));
      for (let f = 1; f <= frames; f++) {
        images.push({
          url: frames > 1 ? `${instanceUrl}/frames/${f}/rendered` : `${instanceUrl}/rendered`,
          instanceUrl, sop, frame: f, frames,
          number: value(ds, TAG.instanceNumber),
          rows: Number(value(ds, TAG.rows) || 0), cols: Number(value(ds, TAG.columns) || 0),
          modality: value(ds, TAG.modality) || modality,
        });
      }
    }
    return images;
  }

  function renderUrl(image, draft = false) {
    const params = new URLSearchParams();
    if (state.window) {
      params.set("window", `${round(state.window[0])},${round(state.window[1])},linear`);
    }
    if (Math.max(image.rows, image.cols) > MAX_SIDE) {
      params.set("viewport", `${MAX_SIDE},${MAX_SIDE}`);
    }
    if (draft) params.set("quality", String(DRAFT_QUALITY));
    const query = params.toString();
    return query ? `${image.url}?${query}` : image.url;
  }

  function current() {
    return state.images[state.index];
  }

  function updatePosition() {
    const n = state.images.length;
    el.position.textContent = n ? `${state.index + 1} / ${n}` : "0 / 0";
    el.slider.value = String(state.index + 1);
    const image = current();
    el.prev.disabled = !n || state.index === 0;
    el.next.disabled = !n || state.index === n - 1;
    tellParent();
    if (!image) return;
    const frame = image.frames > 1 ? `, frame ${image.frame} of ${image.frames}` : "";
    el.image.alt = `Image ${state.index + 1} of ${n}` +
      (image.number !== undefined ? ` (instance number ${image.number}${frame})` : frame);
    el.image.dataset.sop = image.sop;
    el.image.dataset.frame = String(image.frame);
  }

  function show() {
    const image = current();
    if (!image) return;
    updatePosition();
    state.wanted = renderUrl(image, Boolean(state.drag && state.drag.kind === "window"));
    request();
  }

  /* One image request at a time: on a slow line the newest wish replaces the queue, and
   * the image shown stays until the next one has arrived. */
  function request() {
    const loading = state.loadingSince && Date.now() - state.loadingSince < STALL_MS;
    if (loading || !state.wanted || el.image.getAttribute("src") === state.wanted) return;
    state.loadingSince = Date.now();
    el.stage.setAttribute("aria-busy", "true");
    el.image.src = state.wanted;
  }

  function loaded(ok) {
    state.loadingSince = 0;
    el.stage.removeAttribute("aria-busy");
    if (el.image.getAttribute("src") !== state.wanted) {
      request();
      return;
    }
    if (ok) message("");
    else message("This image could not be displayed.");
    if (!state.drag) prefetch(); // the line is idle: fetch the neighbours
  }

  /* Neighbours in the scrolling direction, fetched once the shown image is in. Fetches
   * still running for images that are no longer neighbours are cancelled, so that a slow
   * line is not kept busy with images nobody will look at. */
  function prefetch() {
    const wanted = new Set();
    for (const step of PREFETCH) {
      const image = state.images[state.index + step * state.direction];
      if (image) wanted.add(renderUrl(image));
    }
    for (const [url, img] of state.cache) {
      if (!wanted.has(url) && !img.complete) {
        img.removeAttribute("src");
        state.cache.delete(url);
      }
    }
    for (const url of wanted) {
      let img = state.cache.get(url);
      if (img) {
        state.cache.delete(url); // most recently wanted last
      } else {
        img = new Image();
        img.decoding = "async";
        img.src = url;
      }
      state.cache.set(url, img);
    }
    while (state.cache.size > CACHE_MAX) state.cache.delete(state.cache.keys().next().value);
  }

  function go(index) {
    if (!state.images.length) return;
    const next = Math.min(Math.max(index, 0), state.images.length - 1);
    if (next === state.index) return;
    state.direction = next > state.index ? 1 : -1;
    state.index = next;
    show();
  }

  function message(text) {
    el.stageMessage.textContent = text;
    el.stageMessage.hidden = !text;
  }

  function closeSeries() {
    state.generation++;
    el.viewer.hidden = true;
    el.image.removeAttribute("src");
    state.wanted = "";
    state.loadingSince = 0;
    state.images = [];
    if (state.series) {
      state.series.button.removeAttribute("aria-current");
      state.series.button.focus();
    }
    state.series = null;
  }

  // -- window / level ---------------------------------------------------------------------
  function setPreset(val) {
    const custom = el.preset.querySelector('option[value="custom"]');
    custom.hidden = val !== "custom";
    if (val === "custom" && state.window) {
      custom.textContent = `Custom (${round(state.window[0])}/${round(state.window[1])})`;
    }
    el.preset.value = val;
    el.wlValue.textContent = state.window
      ? `C ${round(state.window[0])} / W ${round(state.window[1])}` : "";
  }

  function choosePreset() {
    const val = el.preset.value;
    if (val === "custom") return;
    state.window = val ? val.split(",").map(Number) : null;
    setPreset(val);
    show();
  }

  /* The file's own window, as the start of a drag: its WindowCenter/Width, else a guess
   * from the modality or the stored bit depth. */
  function fileWindow(image) {
    if (!state.fileWindows.has(image.instanceUrl)) {
      const guess = getJSON(`${image.instanceUrl}/metadata`, "application/dicom+json")
        .then((found) => {
          const ds = found[0] || {};
          const c = Number(value(ds, TAG.center));
          const w = Number(value(ds, TAG.width));
          if (Number.isFinite(c) && Number.isFinite(w) && w > 0) return [c, w];
          if ((image.modality || value(ds, TAG.modality)) === "CT") return [40, 400];
          const bits = Number(value(ds, TAG.bitsStored) || 8);
          return [2 ** (bits - 1), 2 ** bits];
        })
        .catch(() => (image.modality === "CT" ? [40, 400] : [128, 256]));
      state.fileWindows.set(image.instanceUrl, guess);
    }
    return state.fileWindows.get(image.instanceUrl);
  }

  function setMode(mode) {
    state.mode = mode;
    el.modePan.setAttribute("aria-pressed", String(mode === "pan"));
    el.modeWindow.setAttribute("aria-pressed", String(mode === "window"));
    el.stage.classList.toggle("window-mode", mode === "window");
  }

  // -- zoom and pan (client side) ---------------------------------------------------------
  function applyTransform() {
    el.image.style.transform =
      `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
  }

  function zoomBy(factor) {
    state.zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, state.zoom * factor));
    applyTransform();
  }

  function resetView() {
    state.zoom = 1;
    state.panX = 0;
    state.panY = 0;
    applyTransform();
  }

  // -- input ------------------------------------------------------------------------------
  function onPointerDown(e) {
    if (!current() || (e.button !== 0 && e.button !== 2)) return;
    const kind = e.button === 2 || state.mode === "window" ? "window" : "pan";
    const drag = { kind, x: e.clientX, y: e.clientY, panX: state.panX, panY: state.panY,
                   base: null, id: e.pointerId };
    state.drag = drag;
    el.stage.focus({ preventScroll: true }); // preventDefault below would keep it elsewhere
    el.stage.setPointerCapture(e.pointerId);
    if (kind === "window") {
      if (state.window) drag.base = state.window.slice();
      else fileWindow(current()).then((w) => { drag.base = w; });
    }
    e.preventDefault();
  }

  function onPointerMove(e) {
    const drag = state.drag;
    if (!drag || drag.id !== e.pointerId) return;
    const dx = e.clientX - drag.x;
    const dy = e.clientY - drag.y;
    if (drag.kind === "pan") {
      state.panX = drag.panX + dx;
      state.panY = drag.panY + dy;
      applyTransform();
      return;
    }
    if (!drag.base) return;
    const step = Math.max(drag.base[1] / 256, 0.5);
    state.window = [drag.base[0] + dy * step, Math.max(1, drag.base[1] + dx * step)];
    setPreset("custom");
    show();
  }

  function onPointerUp(e) {
    const drag = state.drag;
    if (!drag || drag.id !== e.pointerId) return;
    state.drag = null;
    if (el.stage.hasPointerCapture(e.pointerId)) el.stage.releasePointerCapture(e.pointerId);
    if (drag.kind === "window") show(); // the full-quality image for the final window
  }

  function onWheel(e) {
    if (!current()) return;
    e.preventDefault();
    if (e.ctrlKey || e.metaKey) {
      zoomBy(Math.exp(-e.deltaY * 0.002));
      return;
    }
    const delta = e.deltaMode === 1 ? e.deltaY * 40 : e.deltaY; // lines -> pixels
    state.wheel += delta;
    if (Math.abs(state.wheel) < 40) return;
    const steps = Math.trunc(state.wheel / 100) || Math.sign(state.wheel);
    state.wheel = 0;
    go(state.index + steps);
  }

  function onKey(e) {
    if (el.viewer.hidden || e.altKey || e.ctrlKey || e.metaKey) return;
    const tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
    const actions = {
      ArrowDown: () => go(state.index + 1), ArrowRight: () => go(state.index + 1),
      ArrowUp: () => go(state.index - 1), ArrowLeft: () => go(state.index - 1),
      PageDown: () => go(state.index + 10), PageUp: () => go(state.index - 10),
      Home: () => go(0), End: () => go(state.images.length - 1),
      "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8),
      0: resetView, Escape: closeSeries,
    };
    const action = actions[e.key];
    if (!action) return;
    e.preventDefault();
    action();
  }

  // -- side by side: the comparison page (same origin) frames two viewers ----------------
  // A framed viewer tells its parent where it is, and goes where its parent says (an
  // index, or a fraction of the stack); a move made on the parent's word is marked
  // "synced" so that the parent does not echo it back.
  const framed = window.parent !== window;
  function tellParent() {
    if (!framed) return;
    window.parent.postMessage({ type: "dicomshare-viewer-position", index: state.index,
                                count: state.images.length, synced: state.syncing },
                              location.origin);
  }

  window.addEventListener("message", (e) => {
    if (!framed || e.source !== window.parent || e.origin !== location.origin) return;
    const d = e.data || {};
    const n = state.images.length;
    if (d.type !== "dicomshare-viewer-go" || !n) return;
    const index = typeof d.fraction === "number"
      ? Math.round(Math.min(Math.max(d.fraction, 0), 1) * (n - 1)) : Number(d.index);
    if (!Number.isFinite(index)) return;
    state.syncing = true;
    try {
      go(index);
    } finally {
      state.syncing = false;
    }
  });

  el.image.addEventListener("load", () => loaded(true));
  el.image.addEventListener("error", () => loaded(false));
  el.stage.addEventListener("pointerdown", onPointerDown);
  el.stage.addEventListener("pointermove", onPointerMove);
  el.stage.addEventListener("pointerup", onPointerUp);
  el.stage.addEventListener("pointercancel", onPointerUp);
  el.stage.addEventListener("contextmenu", (e) => e.preventDefault());
  el.stage.addEventListener("wheel", onWheel, { passive: false });
  el.stage.addEventListener("dblclick", resetView);
  document.addEventListener("keydown", onKey);
  el.slider.addEventListener("input", () => go(Number(el.slider.value) - 1));
  el.prev.addEventListener("click", () => go(state.index - 1));
  el.next.addEventListener("click", () => go(state.index + 1));
  el.preset.addEventListener("change", choosePreset);
  el.modePan.addEventListener("click", () => setMode("pan"));
  el.modeWindow.addEventListener("click", () => setMode("window"));
  el.zoomIn.addEventListener("click", () => zoomBy(1.25));
  el.zoomOut.addEventListener("click", () => zoomBy(0.8));
  el.zoomReset.addEventListener("click", resetView);
  el.close.addEventListener("click", closeSeries);

  start();
})();
