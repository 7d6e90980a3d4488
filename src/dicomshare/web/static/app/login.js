// The login page: POST /api/login (JSON), then back to the page that sent us here.
"use strict";

// Only a path on this site (not "//other.site" or "/\other"): no open redirect.
function nextPath() {
  const next = new URLSearchParams(location.search).get("next") || "/app/";
  return /^\/(?![/\\])/.test(next) && !next.startsWith("/app/login") ? next : "/app/";
}

function minutes(seconds) {
  const n = Math.max(1, Math.ceil(Number(seconds) / 60));
  return n === 1 ? "1 minute" : `${n} minutes`;
}

DS.run(async () => {
  const form = document.getElementById("login");
  const box = document.getElementById("login-error");
  const button = form.querySelector("button[type=submit]");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    DS.say(box, "");
    button.disabled = true;
    try {
      await DS.api.post("/api/login", {username: form.username.value,
                                       password: form.password.value});
      location.assign(nextPath());
    } catch (err) {
      // 401: the server's one answer for every wrong name or password; 429: locked or
      // throttled, and the reason says for how long.
      const text = DS.reason(err);
      let message = text.charAt(0).toUpperCase() + text.slice(1) + ".";
      if (err.status === 401) message = "Wrong user name or password.";
      else if (err.status === 429 && err.retryAfter && !/try again/.test(text)) {
        message = `${message} Try again in ${minutes(err.retryAfter)}.`;
      }
      DS.say(box, message);
      form.password.value = "";
      form.password.focus();
    } finally {
      button.disabled = false;
    }
  });
  const config = await DS.settings();
  if (config.oidc) {
    document.getElementById("oidc-link").href =
      "/api/oidc/login?next=" + encodeURIComponent(nextPath());
    document.getElementById("oidc").hidden = false;
  }
});
