// One page for the sites of a capture: the selector shows one site's view (each a self-contained page in
// its own frame) and, for a vision site, the image it saw.
(function () {
  const meta = JSON.parse(document.getElementById("sites-meta").textContent);
  const select = document.getElementById("site-select");
  const picture = document.getElementById("site-image");
  const frames = Array.from(document.querySelectorAll("#site-frames iframe"));
  function show(site) {
    frames.forEach(function (frame) { frame.hidden = frame.dataset.site !== site; });
    picture.hidden = !(meta.vision.indexOf(site) >= 0 && picture.querySelector("img"));
    document.getElementById("site-summary").textContent = meta.summaries[site];
    document.body.dataset.site = site;
  }
  select.addEventListener("change", function () { show(select.value); });
  show(select.value);
  document.body.dataset.ready = "1";
})();
