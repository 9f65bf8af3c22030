// The job page: polls /admin/api/jobs/<id> and updates progress and curves in place.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root || !window.BitCharts) return;
  var api = root.getAttribute("data-api");
  var after = 0;
  var total = Number(root.getAttribute("data-total")) || 0;
  var series = { loss: [], lr: [], val_top1: [] };
  var styles = {
    loss: { color: "#0b5fcc", zeroBased: true },
    lr: { color: "#b35c00", zeroBased: true },
    val_top1: { color: "#17803d", yMin: 0, yMax: 1 }
  };
  var charts = {};
  Array.prototype.forEach.call(root.querySelectorAll("canvas[data-series]"), function (canvas) {
    var name = canvas.getAttribute("data-series");
    var options = Object.assign({ xMax: total }, styles[name]);
    charts[name] = { chart: new window.BitCharts.LineChart(canvas, options), canvas: canvas };
  });

  // Validation points come only from held-out images; say which case this is.
  var holdout = root.getAttribute("data-holdout");
  function emptyValidation(active) {
    if (holdout === "none") return "no held-out images: see the model's cross-validated estimate";
    if (active) return "no validation points yet";
    if (!holdout) return "no validation set";
    return "not validated during training: the model's quality is on its held-out images";
  }

  function text(id, value) {
    var node = document.getElementById(id);
    if (node && node.textContent !== value) node.textContent = value;
  }

  // The history table, rebuilt when an event was added (textContent only: no HTML).
  function renderEvents(events) {
    var body = document.getElementById("events");
    if (!body || Number(body.getAttribute("data-count")) === events.length) return;
    var rows = events.map(function (e) {
      var row = document.createElement("tr");
      [[e.at, "nowrap"], [e.kind, ""], [String(e.attempt), "num"], [String(e.step), "num"],
        [e.worker, "mono"], [e.detail, ""]].forEach(function (cell) {
        var td = document.createElement("td");
        td.textContent = cell[0];
        if (cell[1]) td.className = cell[1];
        row.appendChild(td);
      });
      return row;
    });
    body.replaceChildren.apply(body, rows);
    body.setAttribute("data-count", String(events.length));
  }

  function update(state) {
    after = state.last_id;
    total = state.total_steps || total;
    state.points.forEach(function (p) {
      Object.keys(series).forEach(function (name) {
        if (p[name] !== null && p[name] !== undefined) series[name].push([p.step, p[name]]);
      });
    });
    Object.keys(charts).forEach(function (name) {
      var entry = charts[name];
      entry.chart.options.xMax = total;
      if (name === "val_top1" && !series.val_top1.length) {
        entry.chart.options.empty = emptyValidation(state.active);
        entry.canvas.setAttribute("data-empty", entry.chart.options.empty);
      }
      entry.chart.set(series[name]);
      var last = series[name][series[name].length - 1];
      text("latest-" + name, last ? "step " + last[0] + ": " + window.BitCharts.format(last[1]) : "");
    });

    var bar = document.getElementById("progress");
    if (bar) bar.value = state.progress;
    var pct = (100 * state.progress).toFixed(1) + " %";
    text("progress-text", state.step + (state.total_steps ? " / " + state.total_steps : "") + " steps · " + pct);
    var running = state.status === "running" || state.status === "cancelling";
    text("eta", running ? window.BitDashboard.duration(state.eta_s) : "—");
    text("throughput", state.images_per_s ? Number(state.images_per_s.toPrecision(4)) + " img/s" : "—");
    text("attempts", String(state.attempts));
    text("run-time", window.BitDashboard.duration(state.run_s));
    text("started-at", state.started_at);
    text("finished-at", state.finished_at);
    text("heartbeat-at", state.heartbeat_at);
    text("lease-owner", state.lease_owner);
    renderEvents(state.events);

    var badge = document.querySelector("#status .status");
    if (badge && badge.textContent !== state.status) {
      badge.textContent = state.status;
      badge.className = "status status-" + state.status;
    }
    root.setAttribute("data-status", state.status);
    var cancel = document.getElementById("cancel-form");
    if (cancel) cancel.hidden = !state.can_cancel;
    var retry = document.getElementById("retry-form");
    if (retry) retry.hidden = !state.can_retry;
    var model = document.getElementById("model-link");
    if (model && state.model_id) {
      var link = model.querySelector("a");
      link.href = "/admin/models/" + state.model_id;
      link.textContent = "model " + state.model_id;
      model.hidden = false;
    }
    if (!state.active) {
      text("live-note", "The job has ended (" + state.status + ")" +
        (state.error ? ": " + state.error + " Reload the page for the traceback." : "."));
    }
  }

  function poll() {
    fetch(api + "?after=" + after, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) {
          window.location.href = "/admin/login?next=" + encodeURIComponent(window.location.pathname);
          return null;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (state) {
        if (!state) return;
        update(state);
        if (state.active) window.setTimeout(poll, 1000);
      })
      .catch(function () {
        window.setTimeout(poll, 5000); // the API restarting: try again, more slowly
      });
  }
  poll();
})();
