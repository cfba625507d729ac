// rtdecode view: draws the state the view server sends (GET /state, or pushed over Server-Sent Events on /events).
// Plain browser JavaScript, no framework and nothing fetched from elsewhere. The first state is inlined in the
// page (#initial-state), so it is drawn before the page has finished loading.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Motion plot line colours (tests/rtdecode/view/test_browser.py looks for them). Kept apart from the health colours.
  const COLOURS = {
    trans_x_mm: "#1f77b4",
    trans_y_mm: "#ff7f0e",
    trans_z_mm: "#9467bd",
    rot_x_rad: "#17becf",
    rot_y_rad: "#e377c2",
    rot_z_rad: "#8c564b",
    fd: "#bcbd22",
    threshold: "#7f7f7f",
    flagged: "#d62728",
  };
  const PLOT_HEIGHT = 110;
  const MARGIN = { left: 46, right: 8, top: 14, bottom: 16 };
  const POLL_MS = 1000;
  const MAX_SSE_FAILURES = 3;

  let current = null; // the last state drawn
  let drawnAt = 0; // Date.now() when it was drawn: the page ages "last message" between pushes
  const missingPictures = new Set(); // pool picture URLs that did not load (no such file): not asked for again

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(id, value) {
    const element = byId(id);
    const text = value === null || value === undefined ? "–" : String(value);
    if (element.textContent !== text) element.textContent = text;
  }

  function setSrc(img, url) {
    img.hidden = !url;
    if (url && img.getAttribute("src") !== url) img.setAttribute("src", url);
  }

  function make(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function svg(tag, attributes) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, String(value));
    return element;
  }

  function formatScore(score) {
    return Number.isFinite(score) ? score.toFixed(3) : "–";
  }

  function formatMs(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function formatTime(unixS) {
    return new Date(unixS * 1000).toLocaleTimeString([], { hour12: false });
  }

  // -- health ----------------------------------------------------------------------------------------------

  function drawHealth(state) {
    const health = state.health;
    byId("health").className = `panel level-${health.level}`;
    const badge = { green: "running", amber: "attention", red: "problem" }[health.level] || health.level;
    setText("health-badge", health.state === "waiting" && health.level === "green" ? "waiting" : badge);
    const stateText = health.state ? `daemon ${health.state}` : health.link.text;
    setText("health-state", state.stream ? `${stateText} · stream ${state.stream}` : stateText);
    setText("subject", health.subject ? `${health.subject} ses ${health.session}` : null);
    setText("current-run", state.run);
    setText("n-volumes", health.n_volumes);
    setText("n-betas", health.n_betas);
    setText("n-trials-decoded", health.n_trials_decoded);
    const lost = health.n_trials_skipped === null || health.n_trials_skipped === undefined;
    setText("n-trials-lost", lost ? null : `${health.n_trials_skipped} / ${health.n_trials_failed}`);
    setText("backlog", health.backlog === null || health.backlog === undefined ? null : `${health.backlog} (${health.backlog_peak})`);
    setText("workers", health.workers === null || health.workers === undefined ? null : `${health.workers} (${health.in_flight})`);
    setText("n-restarts", state.n_restarts);
    const reasons = byId("health-reasons");
    reasons.replaceChildren(...health.reasons.map((reason) => make("li", `reason-${reason.code}`, reason.text)));
    drawAge();
  }

  function drawAge() {
    if (!current || current.health.last_message_age_s === null) {
      setText("last-message", null);
      return;
    }
    const ageS = current.health.last_message_age_s + (Date.now() - drawnAt) / 1000;
    setText("last-message", `${ageS.toFixed(1)} s ago`);
  }

  // -- latest trial and gallery -----------------------------------------------------------------------------

  // The retrieval pool's picture of a match (rtdecode view --pool-images), or null: none served, or it did not load.
  function poolUrl(state, id) {
    if (!state.pool_images) return null;
    const url = `/pool/${encodeURIComponent(id)}`;
    return missingPictures.has(url) ? null : url;
  }

  function topMatchUrl(state, trial) {
    return trial.matches.length ? poolUrl(state, trial.matches[0].id) : null;
  }

  // A pool picture that does not load is hidden and not asked for again (the trial falls back to its text).
  function forgetIfMissing(img) {
    img.addEventListener("error", () => {
      const url = img.getAttribute("src");
      if (!url || !url.startsWith("/pool/")) return;
      missingPictures.add(url);
      img.hidden = true;
      if (current) {
        drawLatest(current);
        drawGallery(current);
      }
    });
  }

  // Whether the daemon makes pictures (some trial has one): then a trial without one yet is still decoding.
  function picturesMade(state) {
    const trials = state.latest ? state.gallery.concat([state.latest]) : state.gallery;
    return trials.some((trial) => trial.image_url || trial.preview_url);
  }

  // What a trial without its own picture is waiting for; "" when it has one.
  function trialNote(trial, picturesComing) {
    if (trial.outcome) return trial.outcome;
    if (!trial.parts.length) return "decoding…";
    if (trial.image_url || trial.preview_url) return "";
    if (picturesComing) return "image to come";
    return trial.matches.length ? "retrieval only" : "no picture";
  }

  function drawMatches(state, matches) {
    const list = byId("matches");
    const key = JSON.stringify([state.pool_images, matches, [...missingPictures]]);
    if (list.dataset.key === key) return; // unchanged: keep the elements (and their pictures) as they are
    list.dataset.key = key;
    list.replaceChildren(
      ...matches.map((match) => {
        const item = make("li");
        const url = poolUrl(state, match.id);
        if (url) {
          const picture = make("img", "match-picture");
          picture.alt = match.id;
          forgetIfMissing(picture);
          picture.setAttribute("src", url);
          item.append(picture);
        } else if (state.pool_images) {
          item.append(make("span", "match-picture none")); // no picture of this one: keep the column
        }
        item.append(make("span", "match-id", match.id), make("span", "score", formatScore(match.score)));
        return item;
      }),
    );
  }

  function drawLatest(state) {
    const trial = state.latest;
    const own = trial ? trial.image_url || trial.preview_url : null;
    const top = trial && !own ? topMatchUrl(state, trial) : null;
    byId("latest-empty").hidden = Boolean(trial);
    setSrc(byId("latest-image"), own || top);
    byId("latest-image").alt = top ? "top retrieval match" : "latest reconstruction";
    setSrc(byId("latest-preview"), trial ? trial.preview_url : null);
    byId("latest-preview").parentElement.hidden = !(trial && trial.preview_url); // no empty "preview" frame
    const note = trial ? trialNote(trial, picturesMade(state)) : "";
    const shown = top ? `: the picture is the top match ${trial.matches[0].id}, not a reconstruction` : "";
    setText("latest-note", note ? note + shown : "");
    byId("latest-note").hidden = !note;
    setText("latest-id", trial ? `run ${trial.run} · ${trial.trial_id}` : "");
    setText("caption", trial && trial.caption ? trial.caption : "");
    drawMatches(state, trial ? trial.matches : []);
    if (!trial) {
      setText("latest-meta", "");
      return;
    }
    const parts = [`stimulus ${trial.stimulus_id ?? "?"}`, `parts: ${trial.parts.join(", ") || "none"}`];
    if (trial.worker) parts.push(`worker ${trial.worker} (attempt ${trial.attempt})`);
    if (trial.latencies_ms.image !== undefined) parts.push(`file close → image ${formatMs(trial.latencies_ms.image)}`);
    setText("latest-meta", parts.join(" · "));
  }

  function tileFor(trial) {
    const tile = make("div", "tile");
    tile.dataset.key = `${trial.run}/${trial.trial_id}`;
    tile.append(make("img"), make("div", "pending"), make("div", "tag"), make("div", "label"), make("div", "sub"));
    tile.firstChild.alt = trial.trial_id;
    forgetIfMissing(tile.firstChild);
    return tile;
  }

  // A tile: the trial's image (or preview); without one, the top match's pool picture tagged with what the trial
  // has ("retrieval only"), else the same words in place of the picture.
  function drawTile(state, tile, trial, picturesComing) {
    const [img, pending, tag, label, sub] = tile.children;
    const own = trial.image_url || trial.preview_url;
    const top = own ? null : topMatchUrl(state, trial);
    const note = trialNote(trial, picturesComing);
    setSrc(img, own || top);
    pending.hidden = Boolean(own || top);
    pending.textContent = note;
    tag.hidden = !top;
    tag.textContent = note;
    tile.className = `tile ${trial.outcome || ""}${top ? " top-match" : ""}`;
    label.textContent = trial.trial_id;
    const best = trial.matches.length ? `#1 ${trial.matches[0].id}` : "";
    sub.textContent = trial.caption || best || (trial.stimulus_id ? `stimulus ${trial.stimulus_id}` : "");
    const shown = top ? `picture: the top retrieval match ${trial.matches[0].id}` : "";
    tile.title = [trial.caption, best, note, shown, trial.outcome_text].filter(Boolean).join("\n");
  }

  function drawGallery(state) {
    const gallery = byId("gallery");
    const existing = new Map([...gallery.children].map((tile) => [tile.dataset.key, tile]));
    const picturesComing = picturesMade(state);
    const tiles = state.gallery.map((trial) => {
      const tile = existing.get(`${trial.run}/${trial.trial_id}`) || tileFor(trial);
      drawTile(state, tile, trial, picturesComing);
      return tile;
    });
    const same = tiles.length === gallery.children.length && tiles.every((tile, i) => gallery.children[i] === tile);
    if (!same) gallery.replaceChildren(...tiles);
    setText("gallery-run", state.run === null ? "" : `run ${state.run}: ${state.gallery.length} trials, newest first`);
    const others = state.runs.filter((run) => run.run !== state.run && run.n_trials > 0);
    setText("other-runs", others.length ? `earlier runs kept: ${others.map((r) => `run ${r.run} (${r.n_trials})`).join(", ")}` : "");
  }

  // -- motion -----------------------------------------------------------------------------------------------

  function linePanel(width, title, x, series, options) {
    const group = svg("g");
    const all = series.flatMap((one) => one.values.filter(Number.isFinite)).concat([0], options.threshold ? [options.threshold] : []);
    let low = Math.min(...all);
    let high = Math.max(...all);
    if (high - low < 1e-6) {
      high += 0.5;
      low -= 0.5;
    }
    const xLow = x.length ? x[0] : 0;
    const xHigh = x.length > 1 ? x[x.length - 1] : xLow + 1;
    const plotWidth = width - MARGIN.left - MARGIN.right;
    const plotHeight = PLOT_HEIGHT - MARGIN.top - MARGIN.bottom;
    const px = (v) => MARGIN.left + ((v - xLow) / (xHigh - xLow)) * plotWidth;
    const py = (v) => MARGIN.top + (1 - (v - low) / (high - low)) * plotHeight;
    group.append(svg("rect", { x: MARGIN.left, y: MARGIN.top, width: plotWidth, height: plotHeight, fill: "#fafbfc", stroke: "#e3e6ea" }));
    group.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left + plotWidth, y1: py(0), y2: py(0), stroke: "#c9ced6" }));
    const label = (text, attributes) => {
      const element = svg("text", attributes);
      element.textContent = text;
      group.append(element);
    };
    label(title, { x: MARGIN.left, y: MARGIN.top - 3 });
    label(high.toPrecision(2), { x: MARGIN.left - 4, y: MARGIN.top + 8, "text-anchor": "end" });
    label(low.toPrecision(2), { x: MARGIN.left - 4, y: MARGIN.top + plotHeight, "text-anchor": "end" });
    label(`vol ${xLow}`, { x: MARGIN.left, y: PLOT_HEIGHT - 3 });
    label(`vol ${xHigh}`, { x: MARGIN.left + plotWidth, y: PLOT_HEIGHT - 3, "text-anchor": "end" });
    if (options.threshold) {
      const y = py(options.threshold);
      group.append(svg("line", { x1: MARGIN.left, x2: MARGIN.left + plotWidth, y1: y, y2: y, stroke: COLOURS.threshold, "stroke-width": 2, "stroke-dasharray": "6 4", class: "threshold" }));
      label(`threshold ${options.threshold} mm`, { x: MARGIN.left + 4, y: y - 3 });
    }
    let legendX = MARGIN.left + plotWidth;
    for (const one of series.slice().reverse()) {
      if (x.length > 0) {
        const drawn = one.values.map((v, i) => [x[i], v]).filter(([, v]) => Number.isFinite(v)); // null: a value not sent
        const points = drawn.map(([volume, v]) => `${px(volume).toFixed(1)},${py(v).toFixed(1)}`).join(" ");
        group.append(svg("polyline", { points, fill: "none", stroke: one.colour, "stroke-width": 2, class: `line ${one.key}` }));
      }
      const legend = svg("text", { x: legendX, y: MARGIN.top - 3, "text-anchor": "end", fill: one.colour });
      legend.textContent = one.label;
      legend.style.fill = one.colour;
      group.append(legend);
      legendX -= 8 + 7 * one.label.length;
    }
    for (const volume of options.flagged || []) {
      const i = x.indexOf(volume);
      if (i >= 0 && Number.isFinite(series[0].values[i])) group.append(svg("circle", { cx: px(volume), cy: py(series[0].values[i]), r: 3.5, fill: COLOURS.flagged, class: "flagged" }));
    }
    return group;
  }

  function drawMotion(motion) {
    const container = byId("motion-plot");
    const width = Math.max(300, container.clientWidth || 760);
    const degrees = (name) => motion.params[name].map((v) => (v * 180) / Math.PI);
    const translation = ["x", "y", "z"].map((axis) => ({ key: `trans_${axis}_mm`, label: axis, values: motion.params[`trans_${axis}_mm`], colour: COLOURS[`trans_${axis}_mm`] }));
    const rotation = ["x", "y", "z"].map((axis) => ({ key: `rot_${axis}_rad`, label: `r${axis}`, values: degrees(`rot_${axis}_rad`), colour: COLOURS[`rot_${axis}_rad`] }));
    const fd = [{ key: "fd", label: "FD", values: motion.fd_mm, colour: COLOURS.fd }];
    const plot = svg("svg", { width, height: 3 * PLOT_HEIGHT, viewBox: `0 0 ${width} ${3 * PLOT_HEIGHT}`, role: "img" });
    plot.append(linePanel(width, "translation (mm)", motion.volumes, translation, {}));
    const rotationPanel = linePanel(width, "rotation (deg)", motion.volumes, rotation, {});
    rotationPanel.setAttribute("transform", `translate(0 ${PLOT_HEIGHT})`);
    plot.append(rotationPanel);
    const fdPanel = linePanel(width, "framewise displacement (mm)", motion.volumes, fd, { threshold: motion.fd_threshold_mm, flagged: motion.flagged });
    fdPanel.setAttribute("transform", `translate(0 ${2 * PLOT_HEIGHT})`);
    plot.append(fdPanel);
    container.replaceChildren(plot);
    const flagged = motion.flagged.length ? `; FD above threshold at volume(s) ${motion.flagged.join(", ")}` : "";
    setText("motion-run", motion.run === null ? "" : `run ${motion.run}: ${motion.volumes.length} volumes${flagged}`);
  }

  // -- latency, problems, events ------------------------------------------------------------------------------

  function sparkline(values) {
    const width = 120;
    const height = 18;
    const line = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "sparkline" });
    if (values.length < 2) return line;
    const high = Math.max(...values) || 1;
    const points = values.map((v, i) => `${((i / (values.length - 1)) * width).toFixed(1)},${(height - 1 - (v / high) * (height - 2)).toFixed(1)}`);
    line.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: "#4a5568", "stroke-width": 1.2 }));
    return line;
  }

  function drawLatency(latency) {
    const body = byId("latency").tBodies[0];
    const head = make("tr");
    for (const name of ["stage", "median", "p95", "last", "n", "recent"]) head.append(make("th", "", name));
    const rows = latency.map((stage) => {
      const row = make("tr");
      row.dataset.stage = stage.key;
      row.append(make("td", "", stage.label), make("td", "median", formatMs(stage.median_ms)), make("td", "p95", formatMs(stage.p95_ms)));
      row.append(make("td", "", formatMs(stage.last_ms)), make("td", "", String(stage.n)));
      const cell = make("td");
      cell.append(sparkline(stage.recent_ms));
      row.append(cell);
      return row;
    });
    body.replaceChildren(head, ...(rows.length ? rows : [make("tr", "muted", "no timings yet")]));
  }

  function drawProblems(problems) {
    const names = {
      missing: "volumes missing",
      quarantined: "files quarantined",
      late: "volumes late",
      duplicate: "duplicates",
      out_of_order: "out of order",
      tr_mismatch: "TR mismatches",
      failed: "ingest failures",
      not_preprocessed: "volumes refused",
      trials_skipped: "trials skipped",
      trials_failed: "trials failed",
      errors: "errors",
      messages_lost: "messages lost",
      not_finite: "values not finite",
    };
    const counts = Object.entries(problems.counts).map(([key, n]) => `${names[key] || key}: ${n}`);
    setText("problem-counts", counts.length ? counts.join(" · ") : "none");
    byId("problems").replaceChildren(
      ...problems.items.map((item) => {
        const line = make("li", `problem-${item.kind}`);
        line.append(make("span", "when", formatTime(item.time_unix_s)), document.createTextNode(item.text));
        return line;
      }),
    );
  }

  function drawLog(lines) {
    byId("log").replaceChildren(
      ...lines.map((entry) => {
        const line = make("li", `log-${entry.kind}`);
        line.append(make("span", "when", formatTime(entry.time_unix_s)), document.createTextNode(entry.text));
        return line;
      }),
    );
  }

  function draw(state) {
    current = state;
    drawnAt = Date.now();
    drawHealth(state);
    drawLatest(state);
    drawGallery(state);
    drawMotion(state.motion);
    drawLatency(state.latency);
    drawProblems(state.problems);
    drawLog(state.log);
  }

  // -- updates: Server-Sent Events, else polling --------------------------------------------------------------

  function linkLost(lost) {
    byId("link-lost").hidden = !lost;
  }

  function poll() {
    fetch("/state", { cache: "no-store" })
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(response.statusText))))
      .then((state) => {
        linkLost(false);
        if (!current || state.version !== current.version) draw(state);
      })
      .catch(() => linkLost(true))
      .finally(() => window.setTimeout(poll, POLL_MS));
  }

  function listen() {
    if (!window.EventSource) {
      poll();
      return;
    }
    const source = new EventSource("/events");
    let failures = 0;
    source.onmessage = (event) => {
      failures = 0;
      linkLost(false);
      draw(JSON.parse(event.data));
    };
    source.onerror = () => {
      failures += 1;
      linkLost(true);
      if (failures >= MAX_SSE_FAILURES || source.readyState === EventSource.CLOSED) {
        source.close();
        poll(); // the stream does not get through (a proxy?): ask for the state every second instead
      }
    };
  }

  forgetIfMissing(byId("latest-image"));
  const initial = JSON.parse(byId("initial-state").textContent);
  if (initial) draw(initial);
  window.setInterval(drawAge, 1000);
  window.addEventListener("resize", () => current && drawMotion(current.motion));
  listen();
})();
