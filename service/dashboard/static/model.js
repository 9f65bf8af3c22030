// The model page: pick a class to draw its precision-recall curve; the threshold slider
// shows that class's precision and recall at the chosen probability, read off the stored
// curve as service/dashboard/curves.py value_at does. The curves come from the page's
// <script type="application/json" id="pr-data"> block (data, never run).
(function () {
  "use strict";
  var data = document.getElementById("pr-data");
  var svg = document.getElementById("pr-chart");
  var slider = document.getElementById("threshold");
  var select = document.getElementById("pr-class");
  if (!data || !svg || !slider || !select) return;
  var curves = JSON.parse(data.textContent);
  var box = ["left", "top", "width", "height"].reduce(function (out, name) {
    out[name] = Number(svg.getAttribute("data-" + name));
    return out;
  }, {});
  var line = document.getElementById("pr-line");
  var marker = document.getElementById("pr-marker");

  function clamp(v) { return Math.min(1, Math.max(0, v)); }
  function px(recall) { return Math.round((box.left + clamp(recall) * box.width) * 10) / 10; }
  function py(precision) { return Math.round((box.top + (1 - clamp(precision)) * box.height) * 10) / 10; }
  function percent(v) { return v === null ? "—" : (100 * v).toFixed(1) + " %"; }
  function text(id, value) {
    var node = document.getElementById(id);
    if (node) node.textContent = value;
  }

  // The value of the smallest stored threshold >= t; none: nothing predicted (recall 0).
  function valueAt(curve, t) {
    var best = -1;
    curve.thresholds.forEach(function (s, i) {
      if (s >= t && (best < 0 || s < curve.thresholds[best])) best = i;
    });
    if (best < 0) return { precision: null, recall: 0 };
    return { precision: curve.precision[best], recall: curve.recall[best] };
  }

  function current() { return curves.curves[Number(select.value)]; }

  function drawCurve() {
    var curve = current();
    var points = curve.precision.map(function (p, i) { return px(curve.recall[i]) + "," + py(p); });
    line.setAttribute("points", points.join(" "));
    var name = curves.classes[Number(select.value)];
    text("pr-class-name", name);
    Array.prototype.forEach.call(document.querySelectorAll(".pr-class-name"), function (node) {
      node.textContent = name;
    });
    text("pr-title", "Precision-recall curve of class " + name);
    var option = select.options[select.selectedIndex];
    text("pr-ap", option.getAttribute("data-ap") || "—");
    var best = option.getAttribute("data-best-f1");
    text("suggested", best ? "Best F1 for this class at " + Number(Number(best).toPrecision(3)) + "." : "");
  }

  function showThreshold() {
    var t = Number(slider.value);
    var at = valueAt(current(), t);
    text("threshold-value", t.toFixed(2));
    text("at-precision", percent(at.precision));
    text("at-recall", percent(at.recall));
    if (at.precision === null) {
      marker.setAttribute("visibility", "hidden");
    } else {
      marker.setAttribute("cx", px(at.recall));
      marker.setAttribute("cy", py(at.precision));
      marker.setAttribute("visibility", "visible");
    }
  }

  select.addEventListener("change", function () { drawCurve(); showThreshold(); });
  slider.addEventListener("input", showThreshold);
  drawCurve();
  showThreshold();
})();
