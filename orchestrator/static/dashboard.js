// The dashboard's pages poll the control plane's JSON endpoints and redraw in place (no page reloads).
// Data is put into the DOM with textContent only, never as HTML.
"use strict";

const Dashboard = (() => {
  const POLL_MS = 1500;

  async function getJSON(url) {
    const response = await fetch(url, {credentials: "same-origin"});
    if (response.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname); }
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (className) td.className = className;
    return td;
  }

  function fill(tbody, items, addRow) {
    const fresh = document.createElement("tbody");
    for (const item of items) addRow(fresh.insertRow(), item);
    tbody.replaceChildren(...Array.from(fresh.rows));
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor(seconds % 3600 / 60) + " min";
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds % 86400 / 3600) + " h";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function time(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : ""; }

  function number(x, digits) { return x === null || x === undefined ? "—" : x.toFixed(digits); }

  function stamp() {
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function poll(refresh) {
    // refresh() returns true when it has more to fetch at once (a long job's curves come in batches).
    const tick = async () => {
      let more = false;
      try { more = await refresh(); stamp(); } catch (e) { document.getElementById("updated").textContent = String(e); }
      setTimeout(tick, more ? 0 : POLL_MS);
    };
    tick();
  }

  // -- the jobs list ---------------------------------------------------------------------------------------

  function jobsPage() {
    const params = new URLSearchParams(location.search);
    const stateFilter = document.getElementById("state-filter");
    const labelFilter = document.getElementById("label-filter");
    stateFilter.value = params.get("state") || "";
    labelFilter.value = params.get("label") || "";
    let nextToken = "";

    document.getElementById("filters").addEventListener("submit", (event) => {
      event.preventDefault();
      const query = new URLSearchParams();
      if (stateFilter.value) query.set("state", stateFilter.value);
      if (labelFilter.value.trim()) query.set("label", labelFilter.value.trim());
      location.search = query.toString();
    });
    document.getElementById("next-page").addEventListener("click", () => {
      params.set("page_token", nextToken);
      location.search = params.toString();
    });
    document.getElementById("first-page").addEventListener("click", () => {
      params.delete("page_token");
      location.search = params.toString();
    });

    poll(async () => {
      const data = await getJSON("/api/jobs?" + params.toString());
      nextToken = data.next_page_token;
      document.getElementById("next-page").disabled = !nextToken;
      document.getElementById("first-page").disabled = !params.get("page_token");
      fill(document.querySelector("#jobs tbody"), data.jobs, (row, job) => {
        const link = document.createElement("a");
        link.href = "/jobs/" + encodeURIComponent(job.name);
        link.textContent = job.name;
        row.insertCell().appendChild(link);
        row.dataset.job = job.name;
        cell(row, job.state, "state " + job.state);
        cell(row, job.owner);
        cell(row, job.layout || "—", "layout");
        cell(row, job.step + " / " + job.total_steps, "progress");
        cell(row, duration(job.eta_seconds));
        cell(row, job.tokens_per_second ? Math.round(job.tokens_per_second).toLocaleString() : "—");
        cell(row, job.restarts);
        cell(row, duration(job.age_seconds));
        cell(row, Object.entries(job.labels).map(([k, v]) => k + "=" + v).join(", "));
      });
    });
  }

  // -- a job -----------------------------------------------------------------------------------------------

  const CHARTS = {
    "chart-loss": {title: "Loss", y: "loss", series: [["loss", "training"], ["val_loss", "validation"]]},
    "chart-tps": {title: "Tokens/s", y: "tokens/s", series: [["tokens_per_second", "tokens/s"]]},
    "chart-memory": {title: "Memory (MiB, rank 0 peak)", y: "MiB", series: [["memory_mib", "memory"]]},
  };

  // µP's top singular values: one trace per matrix over steps (a legend only while it stays readable), and a
  // table of the newest value of each against its first.
  function drawSigma(sigma, newest) {
    document.getElementById("sigma-section").hidden = false;
    document.getElementById("sigma-step").textContent = newest.step;
    const byNumber = (a, b) => a.localeCompare(b, undefined, {numeric: true});  // blocks.2 before blocks.10
    const names = Object.keys(sigma).sort(byNumber);
    const traces = names.map(n => ({x: sigma[n].map(p => p[0]), y: sigma[n].map(p => p[1]), name: n,
                                    mode: sigma[n].length > 40 ? "lines" : "lines+markers", type: "scatter"}));
    Plotly.react("chart-sigma", traces, {
      title: {text: "σ_max per matrix"}, margin: {l: 50, r: 10, t: 40, b: 40}, showlegend: names.length <= 16,
      xaxis: {title: {text: "step"}}, yaxis: {title: {text: "σ_max"}, type: "log"}},
      {displaylogo: false, responsive: true});
    const byName = Object.entries(newest.values).sort(([a], [b]) => byNumber(a, b));
    fill(document.querySelector("#sigma tbody"), byName, (row, [n, value]) => {
      const first = sigma[n].find(p => p[1] !== null);
      cell(row, n);
      cell(row, value === null ? "not finite" : value.toPrecision(4));
      cell(row, first ? first[1].toPrecision(4) + " (step " + first[0] + ")" : "—");
      cell(row, first && value !== null && first[1] ? (value / first[1]).toFixed(2) : "—");
    });
  }

  function jobPage(name) {
    let afterMetric = 0;
    const points = {loss: [], val_loss: [], tokens_per_second: [], memory_mib: []};
    const sigma = {};  // parameter name -> [[step, σ_max or null], ...]
    let sigmaNewest = null;  // {step, values}: the newest point that carried σ_max
    let sigmaChanged = false;
    let logRank = null;
    const base = "/api/jobs/" + encodeURIComponent(name);

    const cancelButton = document.getElementById("cancel");
    cancelButton.addEventListener("click", async () => {
      if (!confirm("Cancel job " + name + "?")) return;
      const response = await fetch(base + "/cancel", {method: "POST", credentials: "same-origin"});
      const body = await response.json();
      document.getElementById("cancel-result").textContent =
        response.ok ? "Cancel requested." : (body.error || response.status);
    });

    function drawCharts() {
      for (const [id, chart] of Object.entries(CHARTS)) {
        const traces = chart.series
          .filter(([key], i) => i === 0 || points[key].length)
          .map(([key, label]) => ({
            x: points[key].map(p => p[0]), y: points[key].map(p => p[1]), name: label,
            mode: points[key].length > 40 ? "lines" : "lines+markers", type: "scatter"}));
        Plotly.react(id, traces, {
          title: {text: chart.title}, margin: {l: 50, r: 10, t: 40, b: 40}, showlegend: traces.length > 1,
          xaxis: {title: {text: "step"}}, yaxis: {title: {text: chart.y}}}, {displaylogo: false, responsive: true});
      }
    }

    async function refreshLog() {
      if (logRank === null) return;
      const response = await fetch(base + "/log?rank=" + logRank, {credentials: "same-origin"});
      const pre = document.getElementById("log");
      pre.hidden = false;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
      pre.textContent = "rank " + logRank + " (last lines)\n" + await response.text();
      if (atBottom) pre.scrollTop = pre.scrollHeight;  // follow the tail unless the reader scrolled up
    }

    poll(async () => {
      const data = await getJSON(base + "?after_metric=" + afterMetric);
      const job = data.job;
      const state = document.getElementById("job-state");
      state.textContent = job.state;
      state.className = job.state;
      const cancelling = job.cancel_requested && job.state !== "CANCELLED" ? " (cancel requested)" : "";
      document.getElementById("job-message").textContent = (job.message || job.reason || "") + cancelling;
      document.getElementById("job-layout").textContent = job.layout ? job.layout + " (tp×pp×dp)" : "—";
      document.getElementById("job-step").textContent = job.step;
      document.getElementById("job-total").textContent = job.total_steps;
      document.getElementById("job-loss").textContent = number(job.loss, 4);
      document.getElementById("job-tps").textContent = Math.round(job.tokens_per_second).toLocaleString();
      document.getElementById("job-eta").textContent = duration(job.eta_seconds);
      document.getElementById("job-owner").textContent = job.owner || "—";
      cancelButton.hidden = !data.can_cancel;

      const timeline = document.getElementById("timeline");
      timeline.replaceChildren(...data.attempts.map(a => {
        const box = document.createElement("div");
        box.className = a.state;
        box.textContent = "#" + a.number + " " + a.layout + " · " + a.world_size + " ranks · from step " +
          a.start_step + (a.end_reason ? " · " + a.end_reason : "");
        return box;
      }));
      fill(document.querySelector("#attempts tbody"), data.attempts, (row, a) => {
        cell(row, a.number); cell(row, a.state, a.state); cell(row, a.layout); cell(row, a.world_size);
        cell(row, a.start_step); cell(row, time(a.start_time)); cell(row, time(a.end_time)); cell(row, a.end_reason);
      });
      fill(document.querySelector("#ranks tbody"), data.ranks, (row, r) => {
        cell(row, r.rank); cell(row, r.attempt); cell(row, r.step); cell(row, r.phase || "training");
        cell(row, duration(r.heartbeat_age_seconds) + " ago");
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "Show log";
        button.className = "show-log";
        button.addEventListener("click", () => { logRank = r.rank; refreshLog(); });
        row.insertCell().appendChild(button);
      });
      fill(document.querySelector("#checkpoints tbody"), data.checkpoints, (row, c) => {
        cell(row, c.step); cell(row, c.attempt); cell(row, c.layout); cell(row, bytes(c.size_bytes));
        cell(row, time(c.commit_time));
      });
      fill(document.querySelector("#events tbody"), data.events, (row, e) => {
        cell(row, time(e.time)); cell(row, e.attempt); cell(row, e.type);
        cell(row, e.from_state || e.to_state ? (e.from_state || "") + " → " + (e.to_state || "") : "");
        cell(row, e.reason); cell(row, e.message);
      });

      for (const m of data.metrics) {
        if (m.loss !== null) points.loss.push([m.step, m.loss]);
        if (m.val_loss !== null) points.val_loss.push([m.step, m.val_loss]);
        if (m.loss !== null) points.tokens_per_second.push([m.step, m.tokens_per_second]);
        if (m.memory_bytes) points.memory_mib.push([m.step, m.memory_bytes / 1048576]);
        if (m.sigma_max) {
          for (const [n, value] of Object.entries(m.sigma_max)) (sigma[n] = sigma[n] || []).push([m.step, value]);
          sigmaNewest = {step: m.step, values: m.sigma_max};
          sigmaChanged = true;
        }
        afterMetric = m.id;
      }
      const more = data.metrics.length === data.metric_batch;
      if (!more && (data.metrics.length || !document.getElementById("chart-loss").data)) drawCharts();
      if (!more && sigmaChanged) { drawSigma(sigma, sigmaNewest); sigmaChanged = false; }
      if (!more) await refreshLog();
      return more;
    });
  }

  // -- sweeps ------------------------------------------------------------------------------------------------

  function jobLink(name) {
    const a = document.createElement("a");
    a.href = "/jobs/" + encodeURIComponent(name);
    a.textContent = name;
    return a;
  }

  function sweepsPage() {
    poll(async () => {
      const data = await getJSON("/api/sweeps");
      fill(document.querySelector("#sweeps tbody"), data.sweeps, (row, s) => {
        const link = document.createElement("a");
        link.href = "/sweeps/" + encodeURIComponent(s.name);
        link.textContent = s.name;
        row.insertCell().appendChild(link);
        cell(row, s.state, s.state); cell(row, s.owner); cell(row, s.trials_ended + "/" + s.trials);
        cell(row, s.best_learning_rate === null ? "—" : s.best_learning_rate);
        if (s.target) row.insertCell().appendChild(jobLink(s.target)); else cell(row, "—");
        cell(row, time(s.created));
      });
    });
  }

  function sweepPage(name) {
    const base = "/api/sweeps/" + encodeURIComponent(name);
    const cancelButton = document.getElementById("cancel");
    cancelButton.addEventListener("click", async () => {
      if (!confirm("Cancel sweep " + name + " (its running trials or target too)?")) return;
      const response = await fetch(base + "/cancel", {method: "POST", credentials: "same-origin"});
      const body = await response.json();
      document.getElementById("cancel-result").textContent =
        response.ok ? "Cancel requested." : (body.error || response.status);
    });

    poll(async () => {
      const data = await getJSON(base);
      const sweep = data.sweep;
      const state = document.getElementById("sweep-state");
      state.textContent = sweep.state;
      state.className = sweep.state;
      document.getElementById("sweep-message").textContent = (sweep.reason || "") + " " + (sweep.message || "");
      document.getElementById("proxy-width").textContent = data.proxy_width;
      document.getElementById("target-width").textContent = data.target_width;
      document.getElementById("eval-windows").textContent = data.eval_windows;
      document.getElementById("max-parallel").textContent = data.max_parallel;
      document.getElementById("sweep-owner").textContent = sweep.owner || "—";
      document.getElementById("best").textContent = data.best ?
        data.best.job + " (learning rate " + data.best.learning_rate + ", weight decay " + data.best.weight_decay +
        ", objective " + number(data.best.objective, 4) + ")" : "not yet (every trial must end)";
      const target = document.getElementById("target");
      if (data.target) {
        target.replaceChildren(jobLink(data.target.name),
          " " + data.target.state + " · step " + data.target.step + "/" + data.target.total_steps);
      } else {
        target.textContent = "not started";
      }
      document.getElementById("cost-flops").textContent = (100 * data.tuning.flops_ratio).toFixed(1) + " %";
      document.getElementById("cost-wall").textContent = duration(data.tuning.wall_seconds);
      document.getElementById("warnings").replaceChildren(...sweep.warnings.map(w => {
        const li = document.createElement("li");
        li.textContent = "warning: " + w;
        return li;
      }));
      cancelButton.hidden = !data.can_cancel;

      fill(document.querySelector("#trials tbody"), data.trials, (row, t) => {
        cell(row, t.index + (data.best && data.best.job === t.job ? " ★" : ""));
        if (t.state) row.insertCell().appendChild(jobLink(t.job)); else cell(row, t.job);
        cell(row, t.learning_rate); cell(row, t.weight_decay); cell(row, t.seed);
        cell(row, Object.entries(t.hyperparameters).map(([k, v]) => k + "=" + v).join(", "));
        cell(row, t.state || "not created", t.state || "");
        cell(row, t.step + "/" + t.total_steps);
        cell(row, t.infinite ? "∞" : number(t.objective, 4));
        cell(row, duration(t.wall_seconds));
      });

      // One trace per proxy width (a sweep has one); the chosen point on top.
      const scored = data.trials.filter(t => t.objective !== null);
      const traces = [{x: scored.map(t => t.learning_rate), y: scored.map(t => t.objective),
                       text: scored.map(t => t.job), mode: "markers", type: "scatter",
                       name: "width " + data.proxy_width}];
      if (data.best) {
        traces.push({x: [data.best.learning_rate], y: [data.best.objective], mode: "markers", type: "scatter",
                     name: "chosen", marker: {symbol: "star", size: 14}});
      }
      Plotly.react("chart-sweep", traces, {
        margin: {l: 50, r: 10, t: 20, b: 40}, xaxis: {title: {text: "learning rate"}, type: "log"},
        yaxis: {title: {text: "validation loss (objective)"}}}, {displaylogo: false, responsive: true});
      return false;
    });
  }

  return {jobsPage, jobPage, sweepsPage, sweepPage};
})();

// Each page names itself (and its job or sweep) in <body data-page data-name>: no inline script to start it,
// which the Content-Security-Policy would refuse.
(() => {
  const pages = {jobs: Dashboard.jobsPage, job: Dashboard.jobPage, sweeps: Dashboard.sweepsPage,
                 sweep: Dashboard.sweepPage};
  const start = pages[document.body.dataset.page];
  if (start) start(document.body.dataset.name);
})();
