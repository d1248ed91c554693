// The decode view (viz/decode.py): a step's row of every head, and the text coloured by one head's row.
(function () {
  const meta = JSON.parse(document.getElementById("dv-meta").textContent);
  const raw = atob(document.getElementById("dv-data").textContent.trim());
  const data = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) data[i] = raw.charCodeAt(i);
  const L = meta.layers.length, H = meta.heads.length, LEFT = 44, TOP = 86;  // margins for layer and token labels
  const offsets = [];  // where each step's "l h k" bytes start
  let at = 0;
  for (let s = 0; s < meta.steps; s++) { offsets.push(at); at += L * H * (meta.promptTokens + s); }
  const stepInput = document.getElementById("dv-step"), layerSelect = document.getElementById("dv-layer");
  const headSelect = document.getElementById("dv-head"), text = document.getElementById("dv-text");
  const canvas = document.getElementById("dv-grid"), hover = document.getElementById("dv-hover");
  document.getElementById("dv-title").textContent = meta.title;
  document.getElementById("dv-summary").textContent = meta.summary + "; " + meta.steps + " generated tokens after " +
    meta.promptTokens + " prompt tokens";
  stepInput.max = String(Math.max(0, meta.steps - 1));
  meta.layers.forEach(function (layer, l) { layerSelect.add(new Option("L" + layer, String(l))); });
  headSelect.add(new Option("mean of the layer's heads", "mean"));
  meta.heads.forEach(function (head, h) { headSelect.add(new Option("H" + head + " (KV" + meta.kv[h] + ")", String(h))); });

  function weight(s, l, h, k) {  // decoded weight of head (l, h) at step s on position k
    const keys = meta.promptTokens + s;
    return data[offsets[s] + (l * H + h) * keys + k] / 255 * meta.scales[(s * L + l) * H + h];
  }
  function textRow(s) {  // the weights the text is coloured by: one head's row, or its layer's mean
    const l = Number(layerSelect.value), keys = meta.promptTokens + s, row = new Float64Array(keys);
    const heads = headSelect.value === "mean" ? meta.heads.map(function (_, h) { return h; }) : [Number(headSelect.value)];
    heads.forEach(function (h) { for (let k = 0; k < keys; k++) row[k] += weight(s, l, h, k) / heads.length; });
    return row;
  }
  const spans = meta.tokens.map(function (token, position) {
    const span = document.createElement("span");
    span.textContent = token;
    span.dataset.position = String(position);
    if (position >= meta.promptTokens) {
      span.className = "generated";
      span.title = "step " + (position - meta.promptTokens) + ": what every head looked at to write this token";
      span.addEventListener("click", function () { stepInput.value = String(position - meta.promptTokens); draw(); });
    }
    text.appendChild(span);
    return span;
  });

  function heat(value) {  // white to orange, value in [0, 1]
    const r = 255, g = Math.round(255 - 120 * value), b = Math.round(255 - 230 * value);
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function draw() {
    const s = Number(stepInput.value), keys = meta.promptTokens + s, row = textRow(s);
    let top = 0;
    for (let k = 0; k < keys; k++) top = Math.max(top, row[k]);
    spans.forEach(function (span, position) {
      span.classList.toggle("current", position === keys);
      span.classList.toggle("future", position > keys);
      span.style.background = position < keys && top > 0 ? heat(row[position] / top) : "";
      span.title = position < keys ? "weight " + row[position].toFixed(4) : span.title;
    });
    document.getElementById("dv-step-text").textContent = "writes " + JSON.stringify(meta.tokens[keys] || "") +
      " (position " + keys + ")";
    const cell = Math.max(3, Math.min(36, Math.floor(1000 / keys)));
    const line = Math.max(2, Math.min(8, Math.floor(760 / (L * H))));
    canvas.width = LEFT + keys * cell; canvas.height = TOP + L * H * line;
    const context = canvas.getContext("2d");
    context.fillStyle = getComputedStyle(document.body).getPropertyValue("--panel") || "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    const image = context.createImageData(keys * cell, L * H * line);
    for (let l = 0; l < L; l++) for (let h = 0; h < H; h++) for (let k = 0; k < keys; k++) {
      const value = data[offsets[s] + (l * H + h) * keys + k] / 255;
      const shade = Math.round(255 * (1 - value));
      for (let y = 0; y < line; y++) for (let x = 0; x < cell; x++) {
        const i = (((l * H + h) * line + y) * keys * cell + k * cell + x) * 4;
        image.data[i] = shade; image.data[i + 1] = Math.round(255 - 150 * value); image.data[i + 2] = 255; image.data[i + 3] = 255;
      }
    }
    context.putImageData(image, LEFT, TOP);
    context.fillStyle = "rgba(0,0,0,0.35)";
    for (let l = 1; l < L; l++) context.fillRect(LEFT, TOP + l * H * line, keys * cell, 1);
    context.fillStyle = getComputedStyle(document.body).color || "#000";
    context.font = "11px system-ui, sans-serif";
    const layerEvery = Math.max(1, Math.ceil(12 / (H * line)));
    context.textAlign = "right"; context.textBaseline = "middle";
    for (let l = 0; l < L; l += layerEvery) context.fillText("L" + meta.layers[l], LEFT - 4, TOP + (l + 0.5) * H * line);
    const tokenEvery = Math.max(1, Math.ceil(12 / cell));
    context.textAlign = "left";
    for (let k = 0; k < keys; k += tokenEvery) {
      context.save();
      context.translate(LEFT + (k + 0.5) * cell, TOP - 4);
      context.rotate(-Math.PI / 3);
      context.fillText(meta.tokens[k].slice(0, 14), 0, 0);
      context.restore();
    }
    canvas.dataset.step = String(s);
    document.body.dataset.drawn = String(s);
  }
  canvas.addEventListener("mousemove", function (event) {
    const s = Number(stepInput.value), keys = meta.promptTokens + s;
    const cell = (canvas.width - LEFT) / keys, line = (canvas.height - TOP) / (L * H);
    const k = Math.floor((event.offsetX - LEFT) / cell), r = Math.floor((event.offsetY - TOP) / line);
    if (k < 0 || k >= keys || r < 0 || r >= L * H) return;
    const l = Math.floor(r / H), h = r % H;
    hover.textContent = "L" + meta.layers[l] + "H" + meta.heads[h] + " (KV" + meta.kv[h] + ") → " +
      JSON.stringify(meta.tokens[k]) + " (position " + k + "): " + weight(s, l, h, k).toFixed(4);
  });
  [stepInput, layerSelect, headSelect].forEach(function (input) {
    input.addEventListener("input", draw);
    input.addEventListener("change", draw);
  });
  draw();
  document.body.dataset.ready = "1";
})();
