// The model page: while the evaluation is computed server-side, ask for it every 2 s.
(function () {
  "use strict";
  var box = document.getElementById("evaluation");
  if (!box || box.getAttribute("data-ready") === "true") return;
  var src = box.getAttribute("data-src");
  function poll() {
    fetch(src, { credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 202) { window.setTimeout(poll, 2000); return null; }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (html === null) return;
        box.innerHTML = html; // server-rendered and escaped by the same templates
        box.setAttribute("data-ready", "true");
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
