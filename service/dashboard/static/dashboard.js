// Shared behaviour of the dashboard pages (no inline scripts: the CSP forbids them).
(function () {
  "use strict";
  // Forms that change state can ask for a confirmation first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // "12 s", "4 min 05 s", "2 h 10 min": the same wording as the server's pages.
  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) {
      return "—";
    }
    var s = Math.round(seconds);
    var pad = function (n) { return (n < 10 ? "0" : "") + n; };
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + pad(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + pad(Math.floor((s % 3600) / 60)) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  window.BitDashboard = { duration: duration };
})();
