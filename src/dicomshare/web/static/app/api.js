// Shared by every signed-in page: the JSON API with the session cookie and the CSRF token,
// 401 -> the login page, DOM helpers that write server data as text only, the header
// with the navigation, and the study search (QIDO-RS on the DICOMweb root).
"use strict";

const DS = (() => {
  const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);
  let config = null;

  class ApiError extends Error {
    constructor(status, message, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  function csrfToken() {
    const found = document.cookie.match(/(?:^|; )dicomshare_csrf=([^;]*)/);
    return found ? decodeURIComponent(found[1]) : "";
  }

  function here() {
    return location.pathname + location.search;
  }

  function toLogin() {
    location.assign("/app/login?next=" + encodeURIComponent(here()));
  }

  // fetch() with the session: JSON in and out; errors become ApiError with the reason.
  async function request(method, path, body, accept) {
    const headers = {Accept: accept || "application/json"};
    const init = {method, headers, credentials: "same-origin", cache: "no-store"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (UNSAFE.has(method)) headers["X-CSRF-Token"] = csrfToken();
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "the server cannot be reached; check the connection");
    }
    if (response.status === 401 && path !== "/api/login") {
      toLogin();
      throw new ApiError(401, "your session has ended; log in again");
    }
    if (response.status === 204) return null;
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const reason = data && typeof data.error === "string" ? data.error
        : `the server answered ${response.status}`;
      throw new ApiError(response.status, reason, response.headers.get("Retry-After"));
    }
    return data;
  }

  const api = {
    get: (path) => request("GET", path),
    post: (path, body) => request("POST", path, body === undefined ? {} : body),
    del: (path) => request("DELETE", path),
    raw: request,
  };

  async function settings() {
    if (config === null) config = await request("GET", "/app/config.json");
    return config;
  }

  // el("td", {text: value, testid: "x", className: "y"}, child, ...): never parses HTML.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "testid") node.dataset.testid = value;
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2), value);
      } else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function when(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  // A message in a role=alert (or status) box; text only.
  function say(box, message, kind) {
    box.textContent = message || "";
    box.className = message ? `message ${kind || "error"}` : "message";
    box.hidden = !message;
    if (kind === "ok") box.setAttribute("role", "status");
    else box.setAttribute("role", "alert");
  }

  function reason(err) {
    return err instanceof ApiError || err instanceof Error ? err.message : String(err);
  }

  // Wraps a button's async action: disabled while running, errors to the box.
  function action(button, box, work) {
    button.addEventListener("click", async (event) => {
      event.preventDefault();
      button.disabled = true;
      if (box) say(box, "");
      try {
        await work(event);
      } catch (err) {
        if (box) say(box, reason(err));
      } finally {
        button.disabled = false;
      }
    });
  }

  // A form's submit: the box cleared, the submit button disabled while `work` runs, and
  // its error to the box. When `work` returns "leave" (it navigates away), the button
  // stays disabled.
  function submit(form, box, work) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      say(box, "");
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      let leaving = false;
      try {
        leaving = (await work(event)) === "leave";
      } catch (err) {
        say(box, reason(err));
      } finally {
        if (!leaving) button.disabled = false;
      }
    });
  }

  function copyButton(value, testid) {
    const button = el("button", {type: "button", className: "small", text: "Copy",
                                 testid});
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(value);
        button.textContent = "Copied";
      } catch (err) {
        // Without clipboard access (plain HTTP), select the text for a manual copy.
        const field = button.previousElementSibling;
        if (field && field.select) field.select();
        button.textContent = "Select and copy";
      }
    });
    return button;
  }

  // The "shown once" box for a new secret: a read-only field and a copy button.
  function secretRow(label, value, testid) {
    return el("div", {className: "secret-row"},
      el("label", {text: label}),
      el("div", {className: "secret-value"},
        el("input", {type: "text", readOnly: true, value, testid,
                     "aria-label": label}),
        copyButton(value, `${testid}-copy`)));
  }

  const NAV = [
    ["/app/", "Home"], ["/app/links", "Share links"], ["/app/uploads", "Upload links"],
    ["/app/inbox", "Inbox"], ["/app/consults", "Consults"], ["/app/timeline", "Patients"],
  ];

  // Every page but the login page starts here: who is logged in (401 -> login), and the
  // header with the sections and the logout button.
  async function start() {
    const me = await api.get("/api/me");
    const top = document.getElementById("top");
    if (top) {
      const nav = el("nav", {"aria-label": "Sections"});
      for (const [href, label] of NAV) {
        const current = location.pathname === href ||
          (href !== "/app/" && location.pathname.startsWith(href));
        nav.append(el("a", {href, text: label, "aria-current": current ? "page" : null}));
      }
      const logout = el("button", {type: "button", className: "link", text: "Log out",
                                   testid: "logout"});
      logout.addEventListener("click", async () => {
        try {
          await api.post("/api/logout");
        } finally {
          location.assign("/app/login");
        }
      });
      clear(top).append(
        el("a", {href: "/app/", className: "brand", text: "dicomshare"}), nav,
        el("span", {className: "who", testid: "who",
                    text: `${me.user} · ${me.organisation} (${me.role})`}),
        logout);
    }
    return me;
  }

  // -- study search (QIDO-RS) ----------------------------------------------------------
  const TAG = {
    study: "0020000D", name: "00100010", id: "00100020", date: "00080020",
    description: "00081030", modalities: "00080061", instances: "00201208",
    accession: "00080050",
  };

  function value(item, tag) {
    const attr = item[tag];
    if (!attr || !attr.Value || !attr.Value.length) return "";
    const first = attr.Value[0];
    if (attr.vr === "PN") return (first && first.Alphabetic ? first.Alphabetic : "")
      .replace(/\^+/g, " ").trim();
    return attr.Value.join(", ");
  }

  function dicomDate(text) {
    if (!text) return "";
    const m = /^(\d{4})(\d{2})(\d{2})$/.exec(text);
    return m ? `${m[1]}-${m[2]}-${m[3]}` : text;
  }

  async function qido(path, params) {
    const root = (await settings()).dicomweb_root;
    const query = new URLSearchParams(params || {}).toString();
    const data = await request("GET", `${root}${path}${query ? "?" + query : ""}`,
                               undefined, "application/dicom+json");
    return Array.isArray(data) ? data : [];
  }

  // One study's summary (for lists of UIDs), or null when the caller cannot see it.
  async function studySummary(uid) {
    const found = await qido("/studies", {StudyInstanceUID: uid,
                                          includefield: "00081030,00080061,00201208"});
    return found.length ? summary(found[0]) : null;
  }

  function summary(item) {
    return {
      uid: value(item, TAG.study), patientName: value(item, TAG.name),
      patientId: value(item, TAG.id), date: dicomDate(value(item, TAG.date)),
      description: value(item, TAG.description), modalities: value(item, TAG.modalities),
      instances: value(item, TAG.instances),
    };
  }

  // A search form and a result table with a checkbox per study. Returns {selected()}.
  function studySearch(container, options) {
    const opts = options || {};
    const box = el("div", {className: "message", hidden: true});
    const name = el("input", {type: "search", name: "patient-name", testid: "search-name",
                              placeholder: "e.g. Doe or Doe^Jane"});
    const pid = el("input", {type: "search", name: "patient-id", testid: "search-id"});
    const from = el("input", {type: "date", name: "date-from", testid: "search-from"});
    const to = el("input", {type: "date", name: "date-to", testid: "search-to"});
    const go = el("button", {type: "submit", text: "Search", testid: "search-button"});
    const form = el("form", {className: "search", role: "search"},
      el("label", {}, "Patient name", name), el("label", {}, "Patient ID", pid),
      el("label", {}, "Study date from", from), el("label", {}, "to", to), go);
    const results = el("tbody", {testid: "search-results"});
    const table = el("table", {className: "results", hidden: true},
      el("thead", {}, el("tr", {},
        ["", "Patient", "Patient ID", "Date", "Description", "Modalities", "Images"]
          .map((h) => el("th", {text: h})))),
      results);
    const picked = new Map();
    const count = el("p", {className: "muted", testid: "selected-count",
                           text: "No study selected."});
    container.append(form, box, table, count);

    function updateCount() {
      count.textContent = picked.size === 0 ? "No study selected."
        : `${picked.size} ${picked.size === 1 ? "study" : "studies"} selected.`;
      if (opts.onChange) opts.onChange(picked);
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      say(box, "");
      const params = {limit: "100", includefield: "00081030,00080061,00201208"};
      const n = name.value.trim();
      if (n) {
        params.PatientName = n;
        // Without wildcards: fuzzy matching, i.e. the start of any name part, any case.
        if (!/[*?]/.test(n)) params.fuzzymatching = "true";
      }
      if (pid.value.trim()) params.PatientID = pid.value.trim();
      const a = from.value.replace(/-/g, ""), b = to.value.replace(/-/g, "");
      if (a || b) params.StudyDate = a === b ? a : `${a}-${b}`;
      go.disabled = true;
      try {
        const found = (await qido("/studies", params)).map(summary);
        clear(results);
        for (const study of found) results.append(row(study));
        table.hidden = found.length === 0;
        if (!found.length) say(box, "No studies match.", "info");
      } catch (err) {
        say(box, reason(err));
      } finally {
        go.disabled = false;
      }
    });

    function row(study) {
      const check = el("input", {type: "checkbox", "aria-label": "select study",
                                 testid: "study-pick", checked: picked.has(study.uid)});
      check.addEventListener("change", () => {
        if (check.checked) {
          if (opts.single) {
            picked.clear();
            for (const other of results.querySelectorAll("input[type=checkbox]")) {
              if (other !== check) other.checked = false;
            }
          }
          picked.set(study.uid, study);
        } else {
          picked.delete(study.uid);
        }
        updateCount();
      });
      return el("tr", {testid: "study-result", dataset: {studyUid: study.uid}},
        el("td", {}, check), el("td", {text: study.patientName}),
        el("td", {text: study.patientId}), el("td", {text: study.date}),
        el("td", {text: study.description}), el("td", {text: study.modalities}),
        el("td", {text: study.instances}));
    }

    return {
      selected: () => [...picked.keys()],
      // The selected UIDs; an error (for the form's box) when there are none.
      required() {
        if (!picked.size) throw new Error("Search and select at least one study first.");
        return [...picked.keys()];
      },
      studies: () => [...picked.values()],
      reset() {
        picked.clear();
        for (const c of results.querySelectorAll("input[type=checkbox]")) c.checked = false;
        updateCount();
      },
    };
  }

  // Runs a page's main function once the document is ready; errors go to #page-error.
  function run(main) {
    const go = async () => {
      try {
        await main();
      } catch (err) {
        const box = document.getElementById("page-error");
        if (box && !(err instanceof ApiError && err.status === 401)) say(box, reason(err));
      }
    };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", go);
    else go();
  }

  return {ApiError, api, el, clear, when, say, reason, action, submit, secretRow, start, run,
          settings, studySearch, studySummary, qido, value, TAG};
})();
