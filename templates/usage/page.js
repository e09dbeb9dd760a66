// The usage page's script: counts the reset clocks down every second and refreshes the
// numbers every few seconds from /usage/live (the same HTML fragment the page was rendered
// with), without reloading. Without it the page still shows correct numbers as of its load.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) return;
  var every = Number(live.getAttribute("data-refresh-ms")) || 5000;
  // The server's clock minus the browser's: countdowns count to the server's instants.
  var skew = 0;
  var refreshes = 0;
  // Reset instants that have made the page refresh already (each does once).
  var fired = {};

  // The same shapes as the server writes them (api::page::view::span).
  function span(seconds) {
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    var m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d > 0) return h > 0 ? d + "d " + h + "h" : d + "d";
    if (h > 0) return m > 0 ? h + "h " + m + "m" : h + "h";
    if (m > 0) return s > 0 ? m + "m " + s + "s" : m + "m";
    return s + "s";
  }

  function tick() {
    var now = Date.now() + skew;
    var due = false;
    live.querySelectorAll("time[data-countdown]").forEach(function (t) {
      var left = Math.round((Date.parse(t.getAttribute("datetime")) - now) / 1000);
      if (isNaN(left)) return;
      if (left > 0) { t.textContent = "in " + span(left); return; }
      t.textContent = "now";
      var at = t.getAttribute("datetime");
      if (!fired[at]) { fired[at] = true; due = true; }
    });
    // A clock that reached its reset: the numbers changed, fetch them.
    if (due) refresh();
  }

  function localize() {
    var asOf = live.querySelector("time[data-as-of]");
    if (asOf) {
      var server = Date.parse(asOf.getAttribute("datetime"));
      // The instant is to the second: a skew under one second is noise.
      if (!isNaN(server) && Math.abs(server - Date.now()) > 1500) skew = server - Date.now();
    }
    live.querySelectorAll("time[data-local]").forEach(function (t) {
      var at = new Date(t.getAttribute("datetime"));
      if (!isNaN(at.getTime())) t.textContent = at.toLocaleString();
    });
  }

  var inFlight = false;
  function refresh() {
    if (document.hidden || inFlight) return;
    inFlight = true;
    fetch("/usage/live", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        // Signed out (expired, revoked key): the page shows the sign-in form.
        if (r.status === 401) { window.location.reload(); return null; }
        if (!r.ok) throw new Error("status " + r.status);
        return r.text();
      })
      .then(function (html) {
        if (html === null) return;
        live.innerHTML = html;
        live.classList.remove("stale");
        refreshes += 1;
        live.setAttribute("data-refreshes", String(refreshes));
        localize();
        tick();
      })
      .catch(function () { live.classList.add("stale"); })
      .then(function () { inFlight = false; });
  }

  localize();
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, every);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
})();
