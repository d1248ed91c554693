"use strict";
(() => {
const $ = (id) => document.getElementById(id);
const data = JSON.parse($("atlas-data").textContent);

function fromBase64(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const bin = atob(text), out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
const CMAP = fromBase64(data.cmap);  // 256 RGB triples
const CLASSES = ["vertical+diagonal", "vertical", "diagonal", "block", "heterogeneous"];
const CLASS_COLOURS = {"vertical+diagonal": "#9333ea", "vertical": "#dc2626", "diagonal": "#2563eb",
                       "block": "#16a34a", "heterogeneous": "#a3a7ae"};
// models get colours no pattern class uses, so a model's line never reads as a class
const MODEL_COLOURS = ["#0f766e", "#c2410c", "#a16207", "#be185d", "#4338ca", "#4d7c0f"];
// the score that defines each pattern class (analyses/heads/patterns.py): "Top prompts by" shows it for the
// selected head until the reader picks a metric
const CLASS_METRIC = {"vertical+diagonal": "vertical_score", "vertical": "vertical_score", "diagonal": "diagonal_score",
                      "block": "block_score"};
const MAP_PX = 260, STRIP_PX = 300, CELL = 14;

const models = data.models.map((m, index) => {
  const n = m.heads.layer.length;
  const counts = m.hist ? fromBase64(m.hist) : null;
  return Object.assign(m, {
    index, n, colour: MODEL_COLOURS[index % MODEL_COLOURS.length],
    sim: m.similarity ? fromBase64(m.similarity) : null,
    histCounts: counts ? new Uint16Array(counts.buffer, counts.byteOffset, counts.byteLength / 2) : null,
    thumbData: m.thumbs.map(([q, k, text]) => ({q, k, v: fromBase64(text)})),
    position: Int32Array.from(m.heads.order.map((_, i) => i)).map((_, i) => m.heads.order.indexOf(i)),
    heads: Object.assign(m.heads, {count: Math.max(...m.heads.head) + 1}),
  });
});

const hasClass = models.every((m) => m.heads.class);
const state = {color: hasClass ? "class" : data.metrics[0], rank: data.rankBy[0] || null, sel: null};

// ---- labels and colours ----------------------------------------------------------------------
function label(column) {
  const match = column.match(/^(.*)_(mean|rate)$/);
  if (!match) return column.replace(/_/g, " ");
  return `${match[1].replace(/^pattern_/, "pattern: ").replace(/_/g, " ")} (${match[2]})`;
}
function stem(column) { return column.replace(/_(mean|rate)$/, ""); }
function format(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.001 || a >= 1000) ? v.toExponential(2) : v.toFixed(3);
}
function range(column) {
  let lo = Infinity, hi = -Infinity;
  for (const m of models) for (const v of m.values[column] || []) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return Number.isFinite(lo) ? [lo, hi] : [0, 1];
}
function rgb(t) {
  const i = Math.max(0, Math.min(255, Math.floor(t * 256))) * 3;
  return `rgb(${CMAP[i]},${CMAP[i + 1]},${CMAP[i + 2]})`;
}
function headColour(m, u, scale) {
  if (state.color === "class") return CLASS_COLOURS[m.heads.class[u]] || "#888";
  const v = (m.values[state.color] || [])[u];
  if (v === null || v === undefined) return getComputedStyle(document.documentElement).getPropertyValue("--empty");
  return rgb(scale[1] > scale[0] ? (v - scale[0]) / (scale[1] - scale[0]) : 0.5);
}
function headName(m, u) { return `L${m.heads.layer[u]} H${m.heads.head[u]}`; }

// ---- canvases ----------------------------------------------------------------------------------
function sized(canvas, w, h) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
  canvas.style.width = `${w}px`; canvas.style.height = `${h}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}
const tip = $("tip");
function showTip(event, text) {
  tip.textContent = text; tip.hidden = false;
  tip.style.left = `${event.clientX + 14}px`; tip.style.top = `${event.clientY + 12}px`;
}
function hitCanvas(canvas, find, describe) {
  canvas.classList.add("hit");
  const at = (event) => { const r = canvas.getBoundingClientRect(); return find(event.clientX - r.left, event.clientY - r.top); };
  canvas.addEventListener("mousemove", (event) => { const hit = at(event); if (hit) showTip(event, describe(hit)); else tip.hidden = true; });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (event) => { const hit = at(event); if (hit) select(hit.m, hit.u); });
}

// depth strip: row l spans depth l/L..(l+1)/L of one shared height, so strips of all models line up
function drawStrip(m, canvas, scale) {
  const w = m.heads.count * CELL, ctx = sized(canvas, w, STRIP_PX);
  ctx.clearRect(0, 0, w, STRIP_PX);
  for (let u = 0; u < m.n; u++) {
    const l = m.heads.layer[u], y0 = l / m.numLayers * STRIP_PX, y1 = (l + 1) / m.numLayers * STRIP_PX;
    ctx.fillStyle = headColour(m, u, scale);
    ctx.fillRect(m.heads.head[u] * CELL + 0.5, y0 + 0.5, CELL - 1, Math.max(1, y1 - y0 - 1));
  }
  if (state.sel && state.sel.m === m) {
    const u = state.sel.u, l = m.heads.layer[u];
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot"); ctx.lineWidth = 2;
    ctx.strokeRect(m.heads.head[u] * CELL + 1, l / m.numLayers * STRIP_PX + 1, CELL - 2, STRIP_PX / m.numLayers - 2);
  }
}
function stripHit(m) {
  return (x, y) => {
    const head = Math.floor(x / CELL), layer = Math.floor(y / STRIP_PX * m.numLayers);
    for (let u = 0; u < m.n; u++) if (m.heads.head[u] === head && m.heads.layer[u] === layer) return {m, u};
    return null;
  };
}

function mapFrame(m) {
  const xs = m.heads.x, ys = m.heads.y;
  const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys)) || 1;
  const cx = (Math.max(...xs) + Math.min(...xs)) / 2, cy = (Math.max(...ys) + Math.min(...ys)) / 2;
  const s = (MAP_PX - 20) / span;
  return {px: (u) => MAP_PX / 2 + (xs[u] - cx) * s, py: (u) => MAP_PX / 2 - (ys[u] - cy) * s};
}
function drawMap(m, canvas, scale) {
  const ctx = sized(canvas, MAP_PX, MAP_PX), f = mapFrame(m);
  ctx.clearRect(0, 0, MAP_PX, MAP_PX);
  for (let u = 0; u < m.n; u++) {
    ctx.beginPath(); ctx.arc(f.px(u), f.py(u), 4, 0, 2 * Math.PI);
    ctx.fillStyle = headColour(m, u, scale); ctx.fill();
  }
  if (state.sel && state.sel.m === m) {
    const u = state.sel.u;
    ctx.beginPath(); ctx.arc(f.px(u), f.py(u), 8, 0, 2 * Math.PI);
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot"); ctx.lineWidth = 2.5; ctx.stroke();
  }
}
function mapHit(m) {
  return (x, y) => {
    const f = mapFrame(m);
    let best = null, bestD = 64;
    for (let u = 0; u < m.n; u++) {
      const d = (f.px(u) - x) ** 2 + (f.py(u) - y) ** 2;
      if (d < bestD) { bestD = d; best = {m, u}; }
    }
    return best;
  };
}

function drawMatrix(m, canvas) {
  const ctx = sized(canvas, MAP_PX, MAP_PX);
  const image = new ImageData(m.n, m.n);
  for (let i = 0; i < m.n * m.n; i++) {
    const c = m.sim[i] * 3;
    image.data[4 * i] = CMAP[c]; image.data[4 * i + 1] = CMAP[c + 1]; image.data[4 * i + 2] = CMAP[c + 2]; image.data[4 * i + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = m.n; off.height = m.n; off.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, MAP_PX, MAP_PX);
  if (state.sel && state.sel.m === m) {
    const p = (m.position[state.sel.u] + 0.5) / m.n * MAP_PX;
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot"); ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.moveTo(0, p); ctx.lineTo(MAP_PX, p); ctx.moveTo(p, 0); ctx.lineTo(p, MAP_PX); ctx.stroke();
  }
}
function matrixHit(m) {
  return (x, y) => {
    const i = Math.floor(y / MAP_PX * m.n), j = Math.floor(x / MAP_PX * m.n);
    if (i < 0 || j < 0 || i >= m.n || j >= m.n) return null;
    return {m, u: m.heads.order[i], other: m.heads.order[j], cell: i * m.n + j};
  };
}
function similarityAt(m, cell) { return m.simRange[0] + m.sim[cell] / 255 * (m.simRange[1] - m.simRange[0]); }

// ---- layout ------------------------------------------------------------------------------------
const views = [];
function build() {
  $("title").textContent = data.title;
  $("subtitle").textContent = models.map((m) => `${m.name}: ${m.summary}, ${m.nPrompts} prompts`
    + (m.meanTokens ? ` of ${m.meanTokens.toFixed(0)} tokens on average` : "")
    + (m.gap[0] !== null ? `; KV-group gap ${format(m.gap[0])} [${format(m.gap[1])}, ${format(m.gap[2])}]` : "")).join(" · ");
  $("measure-note").textContent = data.measure === "js"
    ? "(similarity 1 − JS/ln 2, Jensen–Shannon over every query row, mean over prompts; map: MDS of √JS)"
    : "(similarity: Bhattacharyya coefficient, mean over prompts; map: MDS of the Hellinger distance)";
  const colour = $("color-by");
  if (hasClass) colour.add(new Option("pattern class", "class"));
  for (const column of data.metrics) colour.add(new Option(label(column), column));
  colour.value = state.color;
  colour.addEventListener("change", () => { state.color = colour.value; redraw(); });
  const rank = $("rank-by");
  for (const metric of data.rankBy) rank.add(new Option(metric.replace(/_/g, " "), metric));
  rank.disabled = !data.rankBy.length;
  rank.addEventListener("change", () => { state.rank = rank.value; state.rankChosen = true; showDetail(); });

  const row = $("depth-row");
  const axis = document.createElement("canvas");
  axis.className = "axis";
  const axisBox = document.createElement("div");
  axisBox.className = "strip"; axisBox.innerHTML = '<div class="name">&nbsp;</div>'; axisBox.append(axis);
  row.append(axisBox);
  const ctx = sized(axis, 44, STRIP_PX);
  ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--muted"); ctx.font = "11px sans-serif";
  ctx.textAlign = "right";
  for (const d of [0, 0.25, 0.5, 0.75, 1]) ctx.fillText(`${d}`, 40, Math.min(STRIP_PX - 2, Math.max(9, d * STRIP_PX + 4)));
  for (const m of models) {
    const box = document.createElement("div"), strip = document.createElement("canvas");
    box.className = "strip";
    box.innerHTML = `<div class="name" style="color:${m.colour}"></div>`;
    box.firstChild.textContent = m.name;
    box.append(strip);
    row.append(box);
    hitCanvas(strip, stripHit(m), (hit) => `${m.name} ${headName(m, hit.u)} (depth ${format(m.heads.depth[hit.u])}): ${valueText(m, hit.u)}`);
    const card = document.createElement("div");
    card.className = "card";
    card.innerHTML = `<h2></h2><div class="muted summary"></div><div class="figs"><figure><canvas></canvas>
      <figcaption>head map (MDS): close heads attend alike</figcaption></figure><figure><canvas></canvas>
      <figcaption>head × head similarity, clustered</figcaption></figure></div>`;
    card.querySelector("h2").textContent = m.name;
    card.querySelector("h2").style.color = m.colour;
    card.querySelector(".summary").textContent = `${m.summary}; KV ${m.grouping} groups of ${m.groupSize}`;
    const [mapCanvas, matrixCanvas] = card.querySelectorAll("canvas");
    hitCanvas(mapCanvas, mapHit(m), (hit) => `${headName(m, hit.u)}: ${valueText(m, hit.u)}`);
    if (m.sim) {
      hitCanvas(matrixCanvas, matrixHit(m), (hit) => `${headName(m, hit.u)} × ${headName(m, hit.other)}: similarity ${format(similarityAt(m, hit.cell))}`);
    } else matrixCanvas.parentElement.hidden = true;
    $("cards").append(card);
    views.push({m, strip, mapCanvas, matrixCanvas});
  }
  const profileBox = document.createElement("div");
  profileBox.className = "strip";
  profileBox.innerHTML = '<div class="name" id="profile-title"></div><canvas id="profile"></canvas>';
  row.append(profileBox);
  $("theme").addEventListener("click", () => {
    const root = document.documentElement;
    root.dataset.theme = root.dataset.theme === "dark" ? "light" : "dark";
    redraw();
  });
}
function valueText(m, u) {
  if (state.color === "class") return m.heads.class[u];
  return `${label(state.color)} ${format((m.values[state.color] || [])[u])}`;
}

// layer means of the colour metric (KV-group gap in class mode) over relative depth, one line per model
function drawProfile() {
  const canvas = $("profile"), w = 420, h = STRIP_PX, ctx = sized(canvas, w, h);
  const column = state.color === "class" ? "gap_mean" : state.color;
  const base = stem(column), lowName = `${base}_low`, highName = `${base}_high`;
  $("profile-title").textContent = `layer ${label(column)} by relative depth`;
  const series = models.map((m) => ({m, v: m.layers.values[column], lo: m.layers.values[lowName], hi: m.layers.values[highName]}))
    .filter((s) => s.v);
  let lo = Infinity, hi = -Infinity;
  for (const s of series) for (const arr of [s.v, s.lo || s.v, s.hi || s.v]) for (const v of arr) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  ctx.clearRect(0, 0, w, h);
  const muted = getComputedStyle(document.documentElement).getPropertyValue("--muted");
  ctx.fillStyle = muted; ctx.strokeStyle = muted; ctx.font = "11px sans-serif";
  if (!series.length || !Number.isFinite(lo)) { ctx.fillText("no layer values for this column", 10, 20); return; }
  if (hi <= lo) { hi = lo + 1; }
  const left = 64, right = w - 10, top = 8, bottom = h - 24;
  const X = (d) => left + d * (right - left), Y = (v) => bottom - (v - lo) / (hi - lo) * (bottom - top);
  ctx.strokeRect(left, top, right - left, bottom - top);
  ctx.textAlign = "right";
  for (const v of [lo, (lo + hi) / 2, hi]) ctx.fillText(format(v), left - 4, Y(v) + 4);
  ctx.textAlign = "center";
  for (const d of [0, 0.5, 1]) ctx.fillText(`${d}`, X(d), bottom + 14);
  ctx.fillText("relative depth", (left + right) / 2, h - 1);
  ctx.save(); ctx.translate(10, (top + bottom) / 2); ctx.rotate(-Math.PI / 2);  // the y axis says what it shows
  ctx.fillText(`layer mean of ${label(column)}`, 0, 0); ctx.restore();
  for (const s of series) {
    const depth = s.m.layers.depth;
    if (s.lo && s.hi) {
      ctx.beginPath();
      depth.forEach((d, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, X(d), Y(s.hi[i] ?? s.v[i])));
      for (let i = depth.length - 1; i >= 0; i--) ctx.lineTo(X(depth[i]), Y(s.lo[i] ?? s.v[i]));
      ctx.closePath(); ctx.globalAlpha = 0.15; ctx.fillStyle = s.m.colour; ctx.fill(); ctx.globalAlpha = 1;
    }
    ctx.beginPath();
    depth.forEach((d, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, X(d), Y(s.v[i] ?? lo)));
    ctx.strokeStyle = s.m.colour; ctx.lineWidth = 2; ctx.stroke(); ctx.lineWidth = 1;
    for (let i = 0; i < depth.length; i++) { ctx.beginPath(); ctx.arc(X(depth[i]), Y(s.v[i] ?? lo), 2.5, 0, 2 * Math.PI); ctx.fillStyle = s.m.colour; ctx.fill(); }
  }
}

function drawLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  if (state.color === "class") {
    for (const name of CLASSES) {
      const item = document.createElement("span");
      item.className = "swatch"; item.innerHTML = `<i style="background:${CLASS_COLOURS[name]}"></i>`;
      item.append(name);
      legend.append(item);
    }
    return;
  }
  const [lo, hi] = range(state.color), bar = document.createElement("canvas");
  bar.width = 256; bar.height = 1;
  const ctx = bar.getContext("2d");
  for (let i = 0; i < 256; i++) { ctx.fillStyle = rgb(i / 256); ctx.fillRect(i, 0, 1, 1); }
  legend.append(format(lo), bar, format(hi));
}

function redraw() {
  const scale = state.color === "class" ? null : range(state.color);
  for (const v of views) {
    drawStrip(v.m, v.strip, scale);
    drawMap(v.m, v.mapCanvas, scale);
    if (v.m.sim) drawMatrix(v.m, v.matrixCanvas);
  }
  drawProfile();
  drawLegend();
  showDetail();
}

// ---- detail of the selected head ---------------------------------------------------------------
function classMetric(m, u) {
  const metric = m.heads.class ? CLASS_METRIC[m.heads.class[u]] : undefined;
  return data.rankBy.includes(metric) ? metric : null;
}
function select(m, u) {
  state.sel = {m, u};
  const metric = classMetric(m, u);
  if (metric && !state.rankChosen) { state.rank = metric; $("rank-by").value = metric; }
  redraw();
}
// the head the page opens on: of the heads with a pattern class, the one whose class holds on the most prompts,
// ties broken by the mean of its class's score; without classes, the first head in clustering order
function openingHead() {
  let best = null, key = [-1, -Infinity];
  for (const m of models) for (let u = 0; u < m.n; u++) {
    const metric = classMetric(m, u);
    if (!metric) continue;
    const rate = (m.values[`pattern_${m.heads.class[u].replace("+", "_")}_rate`] || [])[u] ?? 0;
    const mean = (m.values[`${metric}_mean`] || [])[u] ?? -Infinity;
    if (rate > key[0] || (rate === key[0] && mean > key[1])) { best = {m, u}; key = [rate, mean]; }
  }
  return best || {m: models[0], u: models[0].heads.order[0]};
}

function drawThumb(canvas, picture) {
  const size = 96, s = size / Math.max(picture.q, picture.k);
  const ctx = sized(canvas, Math.round(picture.k * s), Math.round(picture.q * s));
  const image = new ImageData(picture.k, picture.q);
  for (let i = 0; i < picture.q * picture.k; i++) {
    const level = picture.v[i];
    if (level === 0) { image.data[4 * i + 3] = 0; continue; }
    const c = Math.min(255, Math.floor(Math.sqrt((level - 1) / 254) * 256)) * 3;  // power 0.5: faint structure shows
    image.data[4 * i] = CMAP[c]; image.data[4 * i + 1] = CMAP[c + 1]; image.data[4 * i + 2] = CMAP[c + 2]; image.data[4 * i + 3] = 255;
  }
  const off = document.createElement("canvas");
  off.width = picture.k; off.height = picture.q; off.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, picture.k * s, picture.q * s);
}

function drawHistogram(canvas, counts, mark) {
  const w = 90, h = 18, ctx = sized(canvas, w, h), peak = Math.max(1, ...counts);
  const bw = w / counts.length;
  ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent");
  counts.forEach((c, i) => { const bh = c / peak * (h - 2); ctx.fillRect(i * bw + 0.5, h - bh, bw - 1, bh); });
  if (mark !== null) {
    ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot");
    ctx.fillRect(Math.max(0, Math.min(w - 2, mark * w - 1)), 0, 2, h);
  }
}

function showDetail() {
  const box = $("detail");
  if (!state.sel) return;
  const {m, u} = state.sel;
  box.replaceChildren();
  const title = document.createElement("h2");
  title.id = "detail-title";
  title.textContent = `${m.name} · ${headName(m, u)}`;
  const facts = document.createElement("div");
  facts.className = "muted";
  const kv = m.heads.kv ? `KV group ${m.heads.kv[u]} · ` : "";
  facts.textContent = `${kv}depth ${format(m.heads.depth[u])} · ${m.nPrompts} prompts`;
  box.append(title, facts);
  if (m.heads.class) {
    const rates = CLASSES.map((name) => [name, (m.values[`pattern_${name.replace("+", "_")}_rate`] || [])[u] || 0]);
    const line = document.createElement("div");
    line.textContent = `pattern: ${m.heads.class[u]} (${Math.round((rates.find((r) => r[0] === m.heads.class[u]) || [0, 0])[1] * 100)}% of prompts)`;
    const bar = document.createElement("div");
    bar.className = "classbar";
    for (const [name, rate] of rates) if (rate > 0) {
      const part = document.createElement("span");
      part.style.width = `${rate * 100}%`; part.style.background = CLASS_COLOURS[name]; part.title = `${name}: ${Math.round(rate * 100)}%`;
      bar.append(part);
    }
    box.append(line, bar);
  }
  if (state.rank && m.top[state.rank]) {
    const head = document.createElement("h3");
    head.textContent = `top prompts by ${state.rank.replace(/_/g, " ")}`;
    const list = document.createElement("div");
    list.className = "tops"; list.id = "top-prompts";
    for (const [prompt, value, thumb] of m.top[state.rank][u] || []) {
      const item = document.createElement("div"), text = document.createElement("div");
      item.className = "top";
      if (thumb >= 0) { const canvas = document.createElement("canvas"); drawThumb(canvas, m.thumbData[thumb]); item.append(canvas); }
      text.className = "text";
      const strong = document.createElement("span");
      strong.className = "value"; strong.textContent = `${format(value)} `;
      text.append(strong, data.prompts[prompt].text || data.prompts[prompt].id);
      text.title = data.prompts[prompt].text;
      item.append(text);
      list.append(item);
    }
    box.append(head, list);
  }
  const head = document.createElement("h3");
  head.textContent = "metrics: mean over prompts [95% interval], distribution";
  const table = document.createElement("table");
  table.className = "metrics";
  for (const column of data.metrics) {
    const values = m.values[column];
    if (!values) continue;
    const row = table.insertRow();
    if (column === state.color) row.className = "current";
    const name = row.insertCell(); name.className = "name"; name.textContent = label(column); name.title = column;
    row.insertCell().textContent = format(values[u]);
    const ci = row.insertCell(); ci.className = "ci";
    const lo = m.values[`${stem(column)}_low`], hi = m.values[`${stem(column)}_high`];
    ci.textContent = lo && hi ? `[${format(lo[u])}, ${format(hi[u])}]` : "";
    const cell = row.insertCell(), metric = data.histMetrics.indexOf(stem(column));
    if (metric >= 0 && m.histCounts && column.endsWith("_mean")) {
      const canvas = document.createElement("canvas"), start = (metric * m.n + u) * data.bins;
      const [a, b] = data.histEdges[stem(column)];
      drawHistogram(canvas, Array.from(m.histCounts.slice(start, start + data.bins)), b > a ? (values[u] - a) / (b - a) : null);
      cell.append(canvas);
    }
  }
  box.append(head, table);
}

build();
redraw();
if (models.length) { const {m, u} = openingHead(); select(m, u); }
document.body.dataset.ready = "1";
})();
