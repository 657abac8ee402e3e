// streamrec dashboard: refreshes the overview and a recording's status without a reload,
// sorts tables and draws the flow chart. Served from /ui/static/ (the CSP allows no
// inline script); the pages work without it, only staying as they were rendered.
"use strict";

(function () {
  const EVERY_MS = 2000;
  const SERIES = ["completed", "failed", "dead_lettered", "queued", "duplicate", "rejected"];
  const SVG = "http://www.w3.org/2000/svg";

  function age(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return Math.round(ms) + "ms";
    if (ms < 120000) return (ms / 1000).toFixed(1) + "s";
    if (ms < 7200000) return (ms / 60000).toFixed(1) + "m";
    return (ms / 3600000).toFixed(1) + "h";
  }

  function shown(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  function setField(name, text) {
    document.querySelectorAll('[data-field="' + name + '"]').forEach(function (el) {
      el.textContent = text;
    });
  }

  function setHealth(name, up) {
    document.querySelectorAll('[data-field="health-' + name + '"]').forEach(function (el) {
      el.textContent = name + (up ? " ok" : " down");
      el.classList.toggle("ok", up);
      el.classList.toggle("down", !up);
    });
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      window.location.assign("/ui/login");
      return null;
    }
    if (!response.ok) throw new Error(url + " answered " + response.status);
    return response.json();
  }

  // Call refresh now and every EVERY_MS after the previous one ends; failures are shown.
  function poll(refresh) {
    async function tick() {
      let again = true;
      try {
        again = (await refresh()) !== false;
        document.body.classList.remove("stale");
      } catch (error) {
        document.body.classList.add("stale");
      }
      if (again) window.setTimeout(tick, EVERY_MS);
    }
    tick();
  }

  function reconciled(last, nowMs) {
    if (!last) return "no run yet";
    const head = "last run " + age(Math.max((nowMs || 0) - (last.started_ms || 0), 0)) +
      " ago by " + last.by + " over " + last.window;
    if (last.error) return head + ": FAILED: " + last.error;
    return head + ": " + ["listed", "known", "enqueued", "unassigned"]
      .map(function (name) { return name + " " + last[name]; }).join(", ");
  }

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function drawConsumers(consumers) {
    const body = document.querySelector("#consumers tbody");
    if (!body) return;
    const rows = (consumers || []).map(function (c) {
      const beat = c.heartbeat;
      const tr = document.createElement("tr");
      if (beat) {
        tr.dataset.consumer = c.name;
      } else {
        tr.dataset.absentConsumer = c.name;
        tr.className = "gone";
      }
      cell(tr, c.name);
      cell(tr, beat ? beat.host : "no heartbeat");
      cell(tr, beat ? String(beat.processed) : "–");
      cell(tr, beat ? String(beat.rate_per_s) : "–");
      cell(tr, beat ? String(beat.in_flight) : "–");
      cell(tr, String(c.pending));
      cell(tr, age(c.last_seen_ms_ago) + " ago");
      return tr;
    });
    body.replaceChildren.apply(body, rows);
    const live = (consumers || []).filter(function (c) { return c.heartbeat; }).length;
    setField("consumers-live", live + " consumer" + (live === 1 ? "" : "s") + " alive");
    document.querySelectorAll('[data-field="consumers-live"]').forEach(function (el) {
      el.classList.toggle("ok", live > 0);
      el.classList.toggle("down", live === 0);
    });
  }

  // Each partition's own figures; the table is there only with more than one partition.
  function drawPartitions(parts) {
    const body = document.querySelector("#partitions tbody");
    if (!body || !parts) return;
    const rows = parts.map(function (p) {
      const tr = document.createElement("tr");
      tr.dataset.partition = String(p.index);
      cell(tr, String(p.index));
      cell(tr, p.stream);
      cell(tr, String(p.length));
      cell(tr, shown(p.lag));
      cell(tr, String(p.pending));
      cell(tr, age(p.oldest_pending_idle_ms));
      cell(tr, String(p.dead_letters));
      cell(tr, shown(p.parked));
      [0, 2, 3, 4, 6, 7].forEach(function (i) { tr.cells[i].className = "num"; });
      return tr;
    });
    body.replaceChildren.apply(body, rows);
  }

  function svgElement(name, attributes) {
    const el = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) { el.setAttribute(key, attributes[key]); });
    return el;
  }

  // One polyline per series over the minutes, a common scale, the peak written at the top.
  function drawFlow(series) {
    const svg = document.getElementById("flow");
    if (!svg || !series) return;
    const width = 600, height = 180, top = 16, bottom = 164;
    const minutes = series.minutes || [];
    let peak = 1;
    SERIES.forEach(function (name) {
      (series[name] || []).forEach(function (v) { peak = Math.max(peak, v); });
    });
    const x = function (i) { return minutes.length < 2 ? 0 : (i * width) / (minutes.length - 1); };
    const y = function (v) { return bottom - ((bottom - top) * v) / peak; };
    const parts = [
      svgElement("line", { x1: 0, y1: bottom, x2: width, y2: bottom, class: "axis" }),
      svgElement("line", { x1: 0, y1: top, x2: width, y2: top, class: "grid" }),
    ];
    const label = svgElement("text", { x: 2, y: top - 4, class: "label" });
    label.textContent = peak + " per minute";
    const start = svgElement("text", { x: 2, y: height - 2, class: "label" });
    start.textContent = "60 min ago";
    const end = svgElement("text", { x: width - 2, y: height - 2, class: "label end" });
    end.textContent = "now";
    parts.push(label, start, end);
    SERIES.forEach(function (name) {
      const points = (series[name] || []).map(function (v, i) { return x(i) + "," + y(v); });
      parts.push(svgElement("polyline", { points: points.join(" "), class: "s-" + name }));
      const total = (series[name] || []).reduce(function (a, b) { return a + b; }, 0);
      document.querySelectorAll('[data-series="' + name + '"]').forEach(function (el) {
        el.textContent = String(total);
      });
    });
    svg.replaceChildren.apply(svg, parts);
  }

  function showOverview(doc) {
    const health = doc.health || {};
    setHealth("redis", !!health.redis);
    setHealth("postgres", !!health.postgres);
    ["length", "lag", "pending", "dead_letters"].forEach(function (name) {
      setField(name, shown(doc[name]));
    });
    setField("oldest_waiting", doc.oldest_waiting ? age(doc.oldest_waiting.age_ms) : "none");
    setField("parked", String((doc.businesses || []).reduce(function (a, b) { return a + b.parked; }, 0)));
    const hour = (doc.throughput || {}).last_hour || {};
    ["completed", "failed", "dead_lettered"].forEach(function (name) {
      setField(name + "_hour", shown(hour[name]));
    });
    setField("reconcile", reconciled(doc.reconcile, doc.collected_at_ms));
    const problems = document.getElementById("problems");
    if (problems) {
      problems.replaceChildren.apply(problems, (doc.errors || []).concat(doc.warnings || [])
        .map(function (text) {
          const li = document.createElement("li");
          li.textContent = text;
          return li;
        }));
    }
    drawConsumers(doc.consumers);
    drawPartitions(doc.partitions);
    drawFlow(doc.series);
    const updated = document.getElementById("updated");
    if (updated) updated.textContent = new Date().toLocaleTimeString();
  }

  function overview() {
    poll(async function () {
      const doc = await getJSON("/ui/api/status");
      if (doc) showOverview(doc);
    });
  }

  function recording() {
    const facts = document.getElementById("recording");
    if (!facts) return;
    const sid = facts.dataset.sid;
    poll(async function () {
      const state = await getJSON("/ui/api/recordings/" + encodeURIComponent(sid));
      if (!state) return false;
      const status = document.querySelector('#recording [data-field="status"]');
      if (status) {
        const badge = document.createElement("span");
        badge.className = "status s-" + state.status;
        badge.textContent = state.status;
        status.replaceChildren(badge);
      }
      setField("error", state.error || "");
      setField("attempts", String(state.attempts));
      // A completed row does not change again; an absent one neither.
      return state.status !== "completed" && state.status !== "absent";
    });
  }

  function sortable(table) {
    table.querySelectorAll("th[data-sort]").forEach(function (th, index) {
      th.tabIndex = 0;
      const sort = function () {
        const descending = th.getAttribute("aria-sort") !== "descending";
        table.querySelectorAll("th[data-sort]").forEach(function (other) {
          other.removeAttribute("aria-sort");
        });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows).filter(function (r) { return r.cells.length > index; });
        const value = function (row) {
          const raw = row.cells[index].dataset.value || row.cells[index].textContent;
          const number = Number(raw);
          return raw !== "" && !Number.isNaN(number) ? number : raw;
        };
        rows.sort(function (a, b) {
          const va = value(a), vb = value(b);
          const order = typeof va === "number" && typeof vb === "number"
            ? va - vb : String(va).localeCompare(String(vb));
          return descending ? -order : order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") sort();
      });
    });
  }

  function selectAll() {
    const all = document.getElementById("select-all");
    if (!all) return;
    all.addEventListener("change", function () {
      document.querySelectorAll('#dead input[name="id"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const page = document.body.dataset.page;
    if (page === "overview") overview();
    if (page === "recording") recording();
    document.querySelectorAll("table").forEach(function (table) {
      if (table.querySelector("th[data-sort]")) sortable(table);
    });
    selectAll();
  });
})();
