"use strict";
(() => {
const t0 = performance.now();
const $ = (id) => document.getElementById(id);
const meta = JSON.parse($("hm-meta").textContent);

function fromBase64(text) {
  text = text.trim();
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const bin = atob(text), out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
const raw = fromBase64($("hm-data").textContent);
const values = meta.bits === 8 ? raw : new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2);
const maskBytes = fromBase64($("hm-mask").textContent);

const L = meta.layers.length, H = meta.heads.length, Q = meta.rows.length, K = meta.cols.length;
const topLevel = (1 << meta.bits) - 1;
// attendable cells of each layer, as flat q*K+k indices in row-major order
const stride = Math.ceil(Q * K / 8);
const cells = [], offsets = [];
let offset = 0;
for (let l = 0; l < L; l++) {
  const list = [];
  for (let i = 0; i < Q * K; i++) if ((maskBytes[l * stride + (i >> 3)] >> (7 - (i & 7))) & 1) list.push(i);
  cells.push(Int32Array.from(list));
  offsets.push(offset);
  offset += H * list.length;
}
const decodeMs = performance.now() - t0;
// a difference cube (B - A) is stored with 0 in the middle of the levels; see viz/html.py
const decode = meta.signed ? (v, scale) => (2 * v / topLevel - 1) * scale : (v, scale) => v * scale / topLevel;

function cellValue(l, h, q, k) {
  const list = cells[l], flat = q * K + k;
  let lo = 0, hi = list.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid] === flat) return decode(values[offsets[l] + h * list.length + mid], meta.scales[l * H + h]);
    if (list[mid] < flat) lo = mid + 1; else hi = mid - 1;
  }
  return null;
}

// ---- colours ----
// The same rules as the PNG grid (viz/raster.py): a range [lo, hi] per head or shared, set by the
// in-range cells (the first-token column left out unless "keep"); linear, power, log or row scale;
// LUT index floor(256 x) as matplotlib bins floats; masked first-token cells grey.
const tables = {};
for (const [name, b64] of Object.entries(meta.cmaps)) {
  const rgb = fromBase64(b64), lut = new Uint32Array(256);
  for (let i = 0; i < 256; i++) lut[i] = (255 << 24) | (rgb[3 * i + 2] << 16) | (rgb[3 * i + 1] << 8) | rgb[3 * i];
  tables[name] = lut;
}
const style = meta.style;
const GREY = (255 << 24) | (158 << 16) | (158 << 8) | 158;
const opts = { cmap: style.cmap, scale: style.scale, gamma: style.gamma, range: style.perHead ? "head" : "shared",
  sink: style.sink, weighting: style.weighting };
// value norms ||v_j W_O^h|| ("l h k"): the norm-weighted pattern is alpha_ij times the key's norm
const norms = meta.valueNorms ? new Float32Array(fromBase64(meta.valueNorms).buffer) : null;
function weight(l, h, k) { return opts.weighting === "norms" ? norms[(l * H + h) * K + k] : 1; }
function extremes(r) {  // "keep" ranges include the first-token column, "exclude" ranges do not
  return { high: r.high, low: r.low, maxHigh: Math.max(...r.high.map((v) => (v === null ? -Infinity : v))),
    minLow: Math.min(...r.low.map((v) => (v === null ? Infinity : v))) };
}
const rangeSets = {};
for (const [weighting, sinks] of Object.entries(meta.ranges)) {
  rangeSets[weighting] = { keep: extremes(sinks.keep), exclude: extremes(sinks.exclude) };
}
function headRange(l, h) {
  const r = rangeSets[opts.weighting][opts.sink === "keep" ? "keep" : "exclude"], i = l * H + h;
  const perHead = opts.range === "head";
  let hi = style.vmax !== null ? style.vmax : (perHead ? r.high[i] : r.maxHigh);
  if (hi === null || !isFinite(hi)) hi = 1;
  let lo;
  if (meta.signed) lo = -hi;  // a difference: symmetric around 0 (the ranges hold |B - A|)
  else if (style.vmin !== null) lo = style.vmin;
  else if (opts.scale === "log") {
    const low = perHead ? r.low[i] : r.minLow;
    lo = Math.max(low !== null && isFinite(low) ? low : hi * style.logFloor, hi * style.logFloor);
  } else lo = 0;
  if (!(hi > lo)) hi = lo + Math.max(Math.abs(lo), 1) * 1e-6;
  return [lo, hi];
}
function normaliser(lo, hi) {
  if (opts.scale === "log") {
    const a = Math.log(lo), b = Math.log(hi) - a;
    return (v) => (Math.log(v > 0 ? v : lo) - a) / b;
  }
  if (opts.scale === "power") return (v) => Math.pow(Math.max(0, (v - lo) / (hi - lo)), opts.gamma);
  return (v) => (v - lo) / (hi - lo);
}
function lutIndex(x) { return x >= 1 ? 255 : x > 0 ? Math.floor(x * 256) : 0; }
function headImage(l, h) {
  const image = new ImageData(K, Q), px = new Uint32Array(image.data.buffer);
  const lut = tables[opts.cmap], list = cells[l], base = offsets[l] + h * list.length;
  const scale = meta.scales[l * H + h], sink = meta.sinkColumn;
  const value = (c) => decode(values[base + c], scale) * weight(l, h, list[c] % K);
  const counted = (flat) => opts.sink === "keep" || flat % K !== sink;
  if (opts.scale === "row") {
    const rowMax = new Float64Array(Q);
    for (let c = 0; c < list.length; c++) {
      const q = (list[c] / K) | 0;
      if (counted(list[c])) rowMax[q] = Math.max(rowMax[q], value(c));
    }
    for (let c = 0; c < list.length; c++) {
      const m = rowMax[(list[c] / K) | 0];
      px[list[c]] = lut[lutIndex(m > 0 ? value(c) / m : 0)];
    }
  } else {
    const [lo, hi] = headRange(l, h), norm = normaliser(lo, hi);
    for (let c = 0; c < list.length; c++) px[list[c]] = lut[lutIndex(norm(value(c)))];
  }
  if (opts.sink === "mask") for (let c = 0; c < list.length; c++) if (list[c] % K === sink) px[list[c]] = GREY;
  return image;
}
// heads with a coloured cell above their range (drawn at the top colour): the ranges' "keep" extremes hold
// every cell, so a head whose "keep" high lies above the range drawn has one (for a difference: |B - A|)
function clippedHeads() {
  if (opts.scale === "row" || opts.sink === "mask") return 0;
  const keep = rangeSets[opts.weighting].keep;
  let count = 0;
  for (let l = 0; l < L; l++) for (let h = 0; h < H; h++) {
    const high = keep.high[l * H + h];
    if (high !== null && high > headRange(l, h)[1] * (1 + 1e-6)) count++;
  }
  return count;
}
function rangeText(l, h) {
  if (opts.scale === "row") return ["0", "row max"];
  const [lo, hi] = headRange(l, h);
  return [fmt(lo), fmt(hi)];
}
function drawColorbar() {
  for (const canvas of [$("colorbar"), $("z-colorbar")]) {
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(256, 1);
    const px = new Uint32Array(image.data.buffer), lut = tables[opts.cmap];
    for (let i = 0; i < 256; i++) px[i] = lut[i];
    ctx.putImageData(image, 0, 0);
  }
  const [lo, hi] = rangeText(0, 0);
  $("colorbar").title = opts.range === "head" ? `${opts.scale}, each head's own range` : `${opts.scale}: ${lo} … ${hi}`;
  // the bar's ends in numbers; a per-head range has no single number, so the ends say what they are
  const perHead = opts.range === "head" && opts.scale !== "row";
  $("cb-lo").textContent = perHead ? (meta.signed ? "−head max" : "head min") : lo;
  $("cb-hi").textContent = perHead ? (meta.signed ? "+head max" : "head max") : hi;
  $("cb-what").textContent = meta.signed ? "B − A" : opts.weighting === "norms" ? "‖α f(x)‖" : "attention";
  const beyond = clippedHeads();
  $("cb-beyond").hidden = beyond === 0;
  $("cb-beyond").textContent = "▲ beyond the range";
  $("cb-beyond").title = `${beyond} head(s) hold cells beyond the colour range (e.g. the first token left out of it); `
    + "they are drawn at the end colour of the bar";
  $("o-gamma-box").hidden = opts.scale !== "power";
}

// ---- text ----
function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(a < 1 ? 4 : 3);
}
function showToken(t) { return t || "∅"; }  // labels arrive readable (viz.labels.token_text)
function span(label) { return label.p[0] === label.p[1] ? `#${label.p[0]}` : `#${label.p[0]}–${label.p[1]}`; }
$("title").textContent = meta.title;
$("summary").textContent = `${meta.summary} · ${meta.tokens} tokens · ${L} layers × ${H} heads`
  + (meta.weighting === "norms" ? " · norm-weighted ‖α f(x)‖" : "")
  + (meta.downsampled ? ` · downsampled to ${Q} × ${K} bins` : "");
$("prompt").textContent = meta.prompt || "";
document.title = meta.title;

// ---- grid ----
const grid = $("grid"), thumbs = [];
function buildGrid() {
  const head = grid.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  meta.heads.forEach((h, j) => {
    const th = document.createElement("th");
    th.innerHTML = `H${h}<span class="kv">KV${meta.kv[j]}</span>`;
    if (j > 0 && meta.kv[j] !== meta.kv[j - 1]) th.className = "kvstart";
    th.dataset.col = j;
    head.appendChild(th);
  });
  const body = grid.createTBody();
  meta.layers.forEach((layer, i) => {
    const tr = body.insertRow();
    tr.dataset.row = i;
    const th = document.createElement("th");
    th.textContent = `L${layer}`;
    tr.appendChild(th);
    thumbs.push([]);
    meta.heads.forEach((h, j) => {
      const td = tr.insertCell();
      td.dataset.col = j;
      td.dataset.layer = layer; td.dataset.head = h;
      if (j > 0 && meta.kv[j] !== meta.kv[j - 1]) td.className = "kvstart";
      const canvas = document.createElement("canvas");
      canvas.width = K; canvas.height = Q;
      canvas.className = "thumb";
      canvas.title = `Layer ${layer} · Head ${h} · KV group ${meta.kv[j]}`;
      canvas.addEventListener("click", () => openZoom(i, j));
      td.appendChild(canvas);
      thumbs[i].push(canvas);
    });
  });
}
function sizeThumbs(size) {
  const w = Math.max(1, Math.round(size * Math.min(1, K / Q))), hgt = Math.max(1, Math.round(size * Math.min(1, Q / K)));
  const crisp = size >= Math.max(K, Q);
  for (const row of thumbs) for (const c of row) {
    c.style.width = w + "px"; c.style.height = hgt + "px";
    c.classList.toggle("pixelated", crisp);
  }
}
let renderToken = 0;
function renderThumbs(done) {
  const token = ++renderToken, start = performance.now();
  let n = 0;
  document.body.dataset.drawn = "0";  // "1" once every thumbnail of the latest options is drawn (tests wait on it)
  function chunk() {
    if (token !== renderToken) return;
    const until = performance.now() + 24;
    while (n < L * H && performance.now() < until) {
      const l = Math.floor(n / H), h = n % H;
      thumbs[l][h].getContext("2d").putImageData(headImage(l, h), 0, 0);
      n++;
    }
    if (n < L * H) { setTimeout(chunk, 0); return; }
    document.body.dataset.drawn = "1";
    if (done) done(performance.now() - start);
  }
  chunk();
}

// ---- filters ----
function parseSet(text, allowed) {
  text = text.trim();
  if (!text) return null;
  const out = new Set();
  for (const part of text.split(/[\s,;]+/).filter(Boolean)) {
    const m = part.match(/^(\d+)(?:[-:](\d+))?$/);
    if (!m) return undefined;
    const a = +m[1], b = m[2] === undefined ? a : +m[2];
    for (let v = Math.min(a, b); v <= Math.max(a, b); v++) if (allowed.includes(v)) out.add(v);
  }
  return out;
}
const visible = { rows: meta.layers.map(() => true), cols: meta.heads.map(() => true) };
function applyFilters() {
  const layers = parseSet($("f-layer").value, meta.layers), heads = parseSet($("f-head").value, meta.heads);
  $("f-layer").classList.toggle("invalid", layers === undefined);
  $("f-head").classList.toggle("invalid", heads === undefined);
  const kv = $("f-kv").value === "" ? null : +$("f-kv").value;
  visible.rows = meta.layers.map((l) => !layers || layers.has(l));
  visible.cols = meta.heads.map((h, j) => (!heads || heads.has(h)) && (kv === null || meta.kv[j] === kv));
  for (const tr of grid.tBodies[0].rows) tr.style.display = visible.rows[+tr.dataset.row] ? "" : "none";
  for (const cell of grid.querySelectorAll("[data-col]")) cell.style.display = visible.cols[+cell.dataset.col] ? "" : "none";
  const shown = visible.rows.filter(Boolean).length * visible.cols.filter(Boolean).length;
  $("count").textContent = `${shown} of ${L * H} heads`;
  $("count").dataset.shown = shown;
}
for (let g = 0; g < meta.numKv; g++) $("f-kv").add(new Option(`KV${g}`, String(g)));
for (const id of ["f-layer", "f-head"]) $(id).addEventListener("input", applyFilters);
$("f-kv").addEventListener("change", applyFilters);
$("f-reset").addEventListener("click", () => { $("f-layer").value = ""; $("f-head").value = ""; $("f-kv").value = ""; applyFilters(); });

// ---- zoom ----
const zoom = { l: -1, h: -1, cell: 0, image: null, offscreen: document.createElement("canvas") };
function fitCell() {
  const area = $("z-scroll");
  const w = area.clientWidth - 220, hgt = area.clientHeight - 170;
  return Math.max(3, Math.min(40, Math.floor(Math.min(w / K, hgt / Q))));
}
// labels sit centred on their cell; when cells are smaller than the text, only every n-th shows
function labelAxis(box, labels, cell, vertical) {
  box.textContent = "";
  const font = Math.max(8, Math.min(13, cell - 2)), line = font + 3, every = Math.max(1, Math.ceil(line / cell));
  const divs = labels.map((label, i) => {
    const div = document.createElement("div");
    div.textContent = showToken(label.t);
    div.title = `${label.t} (${span(label)}; raw token ${JSON.stringify(label.r)})`;
    div.style.fontSize = font + "px";
    div.style.lineHeight = line + "px";
    div.style[vertical ? "left" : "top"] = (i + 0.5) * cell - line / 2 + "px";
    div.style[vertical ? "width" : "height"] = line + "px";
    if (label.g) div.classList.add("gen");
    if (i % every) div.classList.add("skip");
    box.appendChild(div);
    return div;
  });
  box.style[vertical ? "width" : "height"] = labels.length * cell + "px";
  const extent = Math.max(0, ...divs.map((d) => (vertical ? d.offsetHeight : d.offsetWidth)));
  box.style[vertical ? "height" : "width"] = extent + "px";
}
function drawZoom(hot) {
  const canvas = $("z-canvas"), ctx = canvas.getContext("2d"), c = zoom.cell, dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, K * c, Q * c);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(zoom.offscreen, 0, 0, K * c, Q * c);
  if (hot) {
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot");
    ctx.lineWidth = Math.max(1, Math.min(2, c / 6));
    ctx.strokeRect(hot.k * c + 0.5, hot.q * c + 0.5, c - 1, c - 1);
  }
}
function layoutZoom() {
  const c = zoom.cell, canvas = $("z-canvas"), dpr = window.devicePixelRatio || 1;
  canvas.width = K * c * dpr; canvas.height = Q * c * dpr;
  canvas.style.width = K * c + "px"; canvas.style.height = Q * c + "px";
  canvas.dataset.cell = c;
  labelAxis($("z-cols"), meta.cols, c, true);
  labelAxis($("z-rows"), meta.rows, c, false);
  drawZoom(null);
}
function openZoom(l, h) {
  document.querySelectorAll("#grid td.selected").forEach((td) => td.classList.remove("selected"));
  thumbs[l][h].parentElement.classList.add("selected");
  zoom.l = l; zoom.h = h;
  const layer = meta.layers[l], head = meta.heads[h];
  $("zoom").hidden = false;
  $("zoom").dataset.layer = layer; $("zoom").dataset.head = head;
  $("z-title").textContent = `Layer ${layer} · Head ${head} · KV group ${meta.kv[h]}`;
  zoom.offscreen.width = K; zoom.offscreen.height = Q;
  zoom.offscreen.getContext("2d").putImageData(headImage(l, h), 0, 0);
  if (!zoom.cell) zoom.cell = fitCell();
  layoutZoom();
  const scale = meta.scales[l * H + h], [lo, hi] = rangeText(l, h);
  $("z-min").textContent = lo;
  $("z-max").textContent = hi;
  const sinkText = { keep: "", exclude: ", first token out of the range", mask: ", first token masked" }[opts.sink];
  $("z-scale").textContent = `${opts.weighting === "norms" ? "norm-weighted ‖α f(x)‖, " : ""}`
    + (meta.signed ? "B − A, symmetric around 0, " : `${opts.scale}${opts.scale === "power" ? " " + opts.gamma : ""}, `)
    + `${opts.range === "shared" ? "shared" : "this head's"} colour range${sinkText}`
    + ` · weights embedded as ${meta.bits}-bit (±${fmt(scale / topLevel / 2)})`;
  $("z-readout").innerHTML = '<span class="muted">Hover a cell to read its weight.</span>';
  showMetrics(layer, head);
  showQk(layer, head, meta.kv[h]);
}
function closeZoom() { $("zoom").hidden = true; }
function showMetrics(layer, head) {
  const table = $("z-metrics");
  table.textContent = "";
  const m = meta.metrics;
  const row = m && m.rows[`${layer},${head}`];
  if (!row) {
    table.insertRow().insertCell().textContent = m ? "No metrics for this head." : "No metrics table was given.";
    return;
  }
  m.columns.forEach((name, i) => {
    const tr = table.insertRow();
    tr.dataset.metric = name;
    const label = tr.insertCell();
    label.textContent = name;
    label.title = name;
    tr.insertCell().textContent = fmt(row[i]);
    const bar = tr.insertCell(), range = m.ranges[i];
    if (range && typeof row[i] === "number") {
      const div = document.createElement("div"), mark = document.createElement("i");
      div.className = "bar";
      const f = range[1] > range[0] ? (row[i] - range[0]) / (range[1] - range[0]) : 0.5;
      mark.style.left = `calc(${(100 * f).toFixed(1)}% - 1px)`;
      div.title = `range over heads: ${fmt(range[0])} … ${fmt(range[1])}`;
      div.appendChild(mark);
      bar.appendChild(div);
    }
  });
}
let lastHot = null;
function hover(event) {
  const rect = $("z-canvas").getBoundingClientRect(), c = zoom.cell;
  const k = Math.floor((event.clientX - rect.left) / c), q = Math.floor((event.clientY - rect.top) / c);
  if (q < 0 || k < 0 || q >= Q || k >= K) return;
  if (lastHot) { lastHot.forEach((d) => d && d.classList.remove("hot")); }
  lastHot = [$("z-rows").children[q], $("z-cols").children[k]];
  lastHot.forEach((d) => d.classList.add("hot"));
  drawZoom({ q, k });
  const v = cellValue(zoom.l, zoom.h, q, k), out = $("z-readout"), row = meta.rows[q], col = meta.cols[k];
  out.dataset.query = q; out.dataset.key = k; out.dataset.value = v === null ? "" : v;
  const tok = (label) => `<code></code> <span class="muted">${span(label)}</span>`;
  out.innerHTML = `<div>query ${tok(row)}</div><div>key&nbsp;&nbsp;&nbsp;${tok(col)}</div><div class="value"></div>`;
  const codes = out.querySelectorAll("code");
  codes[0].textContent = showToken(row.t); codes[1].textContent = showToken(col.t);
  codes[0].title = `raw token ${JSON.stringify(row.r)}`; codes[1].title = `raw token ${JSON.stringify(col.r)}`;
  out.querySelector(".value").innerHTML = v === null ? '<span class="muted">empty (masked: future, padding or outside the window)</span>' : `<b></b>`;
  if (v !== null) out.querySelector("b").textContent = fmt(v);
  if (v !== null && norms) {
    const weighted = v * norms[(zoom.l * H + zoom.h) * K + k];
    out.dataset.weighted = weighted;
    const line = document.createElement("div");
    line.className = "muted";
    line.textContent = `‖α f(x)‖ ${fmt(weighted)} (key's value norm ${fmt(norms[(zoom.l * H + zoom.h) * K + k])})`;
    out.appendChild(line);
  }
}

// ---- query-key map of the zoomed head's KV group ----
const qkMaps = {};
for (const [id, m] of Object.entries(meta.qk || {})) qkMaps[id] = { ...m, xy: new Float32Array(fromBase64(m.points).buffer) };
const qk = { map: null, head: -1, placed: [] };
function drawQk(hot) {
  const canvas = $("z-qk"), ctx = canvas.getContext("2d"), m = qk.map, w = canvas.width, hgt = canvas.height;
  ctx.clearRect(0, 0, w, hgt);
  if (!m) return;
  const n = m.positions.length, lut = tables[opts.cmap], last = Math.max(1, Math.max(...m.positions));
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) {
    x0 = Math.min(x0, m.xy[2 * i]); x1 = Math.max(x1, m.xy[2 * i]);
    y0 = Math.min(y0, m.xy[2 * i + 1]); y1 = Math.max(y1, m.xy[2 * i + 1]);
  }
  const span = Math.max(x1 - x0, y1 - y0) || 1, pad = 12, scale = (Math.min(w, hgt) - 2 * pad) / span;
  const perHead = (n - m.keys) / m.heads.length;
  qk.placed = [];
  const colour = (p) => { const c = lut[Math.min(255, Math.floor(256 * p / last))]; return `rgb(${c & 255},${(c >> 8) & 255},${(c >> 16) & 255})`; };
  for (let i = 0; i < n; i++) {
    const isKey = i >= n - m.keys, head = isKey ? -1 : m.heads[Math.floor(i / perHead)];
    const x = pad + (m.xy[2 * i] - x0) * scale, y = hgt - pad - (m.xy[2 * i + 1] - y0) * scale;
    qk.placed.push({ x, y, isKey, head, position: m.positions[i] });
    ctx.globalAlpha = isKey || head === qk.head ? 1 : 0.18;
    ctx.fillStyle = colour(m.positions[i]);
    ctx.beginPath();
    if (isKey) { ctx.moveTo(x, y - 4.5); ctx.lineTo(x + 4, y + 3); ctx.lineTo(x - 4, y + 3); ctx.closePath(); }
    else ctx.arc(x, y, 3.2, 0, 2 * Math.PI);
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  if (hot) {
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot");
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(hot.x, hot.y, 7, 0, 2 * Math.PI); ctx.stroke();
  }
}
function showQk(layer, head, group) {
  qk.map = qkMaps[`${layer},${group}`] || null;
  qk.head = head;
  for (const id of ["z-qk-title", "z-qk", "z-qk-readout"]) $(id).hidden = !qk.map;
  if (!qk.map) return;
  const shares = qk.map.explained ? `, PCA ${qk.map.explained.map((x) => Math.round(100 * x) + "%").join(" + ")}` : "";
  $("z-qk-title").textContent = `Query-key map · KV group ${group}${shares}`;
  $("z-qk-readout").textContent = "Dots: this head's queries (other heads of the group faint); triangles: keys. Hover a point.";
  drawQk(null);
}
$("z-qk").addEventListener("mousemove", (event) => {
  const rect = $("z-qk").getBoundingClientRect(), sx = $("z-qk").width / rect.width;
  const x = (event.clientX - rect.left) * sx, y = (event.clientY - rect.top) * sx;
  let best = null, bestD = 64;
  for (const p of qk.placed) {
    if (!p.isKey && p.head !== qk.head) continue;
    const d = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (d < bestD) { best = p; bestD = d; }
  }
  if (!best) return;
  drawQk(best);
  const token = showToken(meta.cols[best.position] ? meta.cols[best.position].t : `#${best.position}`);
  const out = $("z-qk-readout");
  out.dataset.kind = best.isKey ? "key" : "query";
  out.dataset.position = best.position;
  out.textContent = `${best.isKey ? "key" : `query (H${best.head})`} ${token} #${best.position}`;
});
$("z-canvas").addEventListener("mousemove", hover);
$("z-close").addEventListener("click", closeZoom);
function setCell(cell) { zoom.cell = Math.max(2, Math.min(48, cell)); layoutZoom(); }
$("z-in").addEventListener("click", () => setCell(zoom.cell + 2));
$("z-out").addEventListener("click", () => setCell(zoom.cell - 2));
$("z-fit").addEventListener("click", () => setCell(fitCell()));
function step(dl, dh) {
  let l = zoom.l, h = zoom.h;
  do { l += dl; h += dh; } while (l >= 0 && l < L && h >= 0 && h < H && !(visible.rows[l] && visible.cols[h]));
  if (l >= 0 && l < L && h >= 0 && h < H) openZoom(l, h);
}
document.addEventListener("keydown", (e) => {
  if ($("zoom").hidden || e.target.tagName === "INPUT") return;
  const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  if (e.key === "Escape") closeZoom();
  else if (moves[e.key]) { step(...moves[e.key]); e.preventDefault(); }
  else if (e.key === "+" || e.key === "=") setCell(zoom.cell + 2);
  else if (e.key === "-") setCell(zoom.cell - 2);
});

// ---- options ----
for (const name of Object.keys(tables)) $("o-cmap").add(new Option(name, name));
$("o-cmap").value = opts.cmap;
if (![...$("o-gamma").options].some((o) => +o.value === opts.gamma)) $("o-gamma").add(new Option(String(opts.gamma), String(opts.gamma)));
$("o-weighting-box").hidden = !norms;
if (meta.signed) {  // a difference has one honest scale: linear, symmetric around 0
  $("o-scale").disabled = true;
  $("o-scale").title = "a difference B − A is drawn on a linear range symmetric around 0";
}
for (const [id, key] of [["o-scale", "scale"], ["o-gamma", "gamma"], ["o-range", "range"], ["o-sink", "sink"],
                         ["o-weighting", "weighting"]]) {
  $(id).value = String(opts[key]);
  $(id).addEventListener("change", (e) => { opts[key] = key === "gamma" ? +e.target.value : e.target.value; rerender(); });
}
function rerender() {
  drawColorbar();
  renderThumbs();
  if (!$("zoom").hidden) openZoom(zoom.l, zoom.h);
}
$("o-cmap").addEventListener("change", (e) => { opts.cmap = e.target.value; rerender(); });
$("o-size").addEventListener("input", (e) => sizeThumbs(+e.target.value));
const dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
document.documentElement.dataset.theme = dark ? "dark" : "light";
document.querySelectorAll(".theme-toggle").forEach((button) => button.addEventListener("click", () => {
  const root = document.documentElement;
  root.dataset.theme = root.dataset.theme === "dark" ? "light" : "dark";
  if (!$("zoom").hidden) drawZoom(null);
}));

buildGrid();
const fit = Math.floor((document.documentElement.clientWidth - 120) / (H + 0.3 * meta.numKv) - 3);
$("o-size").value = Math.max(40, Math.min(96, fit));
sizeThumbs(+$("o-size").value);
applyFilters();
drawColorbar();
renderThumbs((ms) => {
  window.heatmapStats = { decodeMs, renderMs: ms, readyAt: performance.now(), thumbs: L * H };
  document.body.dataset.ready = "1";
});
})();
