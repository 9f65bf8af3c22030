// Small line charts on <canvas>: steps on x, one series on y. No library, works offline.
(function () {
  "use strict";

  function niceStep(range, count) {
    var raw = range / Math.max(1, count);
    var power = Math.pow(10, Math.floor(Math.log10(raw)));
    var unit = raw / power;
    var nice = unit < 1.5 ? 1 : unit < 3 ? 2 : unit < 7 ? 5 : 10;
    return nice * power;
  }

  function ticks(min, max, count) {
    if (!(max > min)) { return [min]; }
    var step = niceStep(max - min, count);
    var out = [];
    for (var v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  // Compact numbers: 0.25, 1.3, 3e-4 (learning rates are small).
  function format(value) {
    if (value === 0) return "0";
    var a = Math.abs(value);
    if (a >= 1000) return value.toFixed(0);
    if (a >= 0.01) return String(Number(value.toPrecision(3)));
    return value.toExponential(1).replace("e-", "e−");
  }

  // Words of `text` in lines no wider than `width` (a message in a narrow chart).
  function wrap(g, text, width) {
    var lines = [];
    text.split(" ").forEach(function (word) {
      var last = lines.length - 1;
      if (last >= 0 && g.measureText(lines[last] + " " + word).width <= width) {
        lines[last] += " " + word;
      } else {
        lines.push(word);
      }
    });
    return lines;
  }

  function LineChart(canvas, options) {
    this.canvas = canvas;
    this.options = options || {};
    this.points = [];
    var chart = this;
    window.addEventListener("resize", function () { chart.draw(); });
  }

  // points: [[step, value], ...]; drawn sorted by step (a resumed run rewrites steps).
  LineChart.prototype.set = function (points) {
    this.points = points.slice().sort(function (a, b) { return a[0] - b[0]; });
    this.canvas.setAttribute("data-points", String(this.points.length));
    this.draw();
  };

  LineChart.prototype.draw = function () {
    var canvas = this.canvas;
    var width = canvas.clientWidth;
    var height = canvas.clientHeight;
    if (!width || !height) return;
    var ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    var g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";

    var pad = { left: 54, right: 12, top: 10, bottom: 28 };
    var plotW = width - pad.left - pad.right;
    var plotH = height - pad.top - pad.bottom;
    var pts = this.points;
    var opts = this.options;

    var xMax = Math.max(opts.xMax || 0, pts.length ? pts[pts.length - 1][0] : 0, 1);
    var yMin = opts.yMin !== undefined ? opts.yMin : Infinity;
    var yMax = opts.yMax !== undefined ? opts.yMax : -Infinity;
    if (opts.yMin === undefined || opts.yMax === undefined) {
      pts.forEach(function (p) {
        if (opts.yMin === undefined) yMin = Math.min(yMin, p[1]);
        if (opts.yMax === undefined) yMax = Math.max(yMax, p[1]);
      });
      if (opts.yMin === undefined && yMin > 0 && opts.zeroBased) yMin = 0;
    }
    if (!isFinite(yMin) || !isFinite(yMax)) { yMin = 0; yMax = 1; }
    if (yMax - yMin < 1e-12) { yMax = yMin + (Math.abs(yMin) || 1) * 0.1; }
    var x = function (step) { return pad.left + (step / xMax) * plotW; };
    var y = function (value) { return pad.top + (1 - (value - yMin) / (yMax - yMin)) * plotH; };

    // grid and axes
    g.strokeStyle = "#e3e7eb";
    g.fillStyle = "#56606b";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    ticks(yMin, yMax, 4).forEach(function (v) {
      var py = Math.round(y(v)) + 0.5;
      g.beginPath(); g.moveTo(pad.left, py); g.lineTo(pad.left + plotW, py); g.stroke();
      g.fillText(format(v), pad.left - 6, py);
    });
    g.textAlign = "center";
    g.textBaseline = "top";
    ticks(0, xMax, Math.max(2, Math.floor(plotW / 70))).forEach(function (v) {
      var px = Math.round(x(v)) + 0.5;
      var label = format(v);
      // Keep the last label inside the canvas: centred labels overhang the right edge.
      var half = g.measureText(label).width / 2;
      g.beginPath(); g.moveTo(px, pad.top + plotH); g.lineTo(px, pad.top + plotH + 4); g.stroke();
      g.fillText(label, Math.min(px, width - half - 1), pad.top + plotH + 7);
    });
    g.strokeStyle = "#9aa5b1";
    g.beginPath(); g.moveTo(pad.left + 0.5, pad.top); g.lineTo(pad.left + 0.5, pad.top + plotH);
    g.lineTo(pad.left + plotW, pad.top + plotH); g.stroke();

    if (!pts.length) {
      g.fillStyle = "#56606b";
      g.textBaseline = "middle";
      var lines = wrap(g, opts.empty || "waiting for the first steps…", plotW - 12);
      lines.forEach(function (line, i) {
        g.fillText(line, pad.left + plotW / 2, pad.top + plotH / 2 + (i - (lines.length - 1) / 2) * 16);
      });
      return;
    }
    g.strokeStyle = opts.color || "#0b5fcc";
    g.lineWidth = 2;
    g.lineJoin = "round";
    g.beginPath();
    pts.forEach(function (p, i) {
      if (i === 0) g.moveTo(x(p[0]), y(p[1])); else g.lineTo(x(p[0]), y(p[1]));
    });
    g.stroke();
    if (pts.length <= 60) {
      g.fillStyle = opts.color || "#0b5fcc";
      pts.forEach(function (p) {
        g.beginPath(); g.arc(x(p[0]), y(p[1]), 2.5, 0, 2 * Math.PI); g.fill();
      });
    }
  };

  window.BitCharts = { LineChart: LineChart, format: format };
})();
