/* trsae dashboard: shared helpers (no dependencies). Data files call TRSAE.index(...) / TRSAE.feature(...). */
"use strict";
var TRSAE = window.TRSAE || {};
window.TRSAE = TRSAE;

TRSAE.esc = function (s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
  });
};

TRSAE.fmt = function (x) {
  if (x === null || x === undefined) return "";
  if (typeof x !== "number") return String(x);
  if (x === 0) return "0";
  var a = Math.abs(x);
  if (a >= 1000 || a < 0.001) return x.toExponential(2);
  return String(Number(x.toPrecision(3)));
};

/* How a token is shown: whitespace made visible, never empty. */
TRSAE.tokText = function (s) {
  var t = String(s).replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  return t === "" ? "\u2205" : t;
};

/* ---------------------------------------------------------------- tooltip: any element with data-tip */
(function () {
  var tip = null;
  function show(el, ev) {
    tip = tip || document.getElementById("tip");
    if (!tip) return;
    tip.textContent = el.getAttribute("data-tip");
    tip.hidden = false;
    var x = ev.clientX + 12, y = ev.clientY + 14;
    tip.style.left = Math.min(x, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = Math.min(y, window.innerHeight - tip.offsetHeight - 8) + "px";
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (el) show(el, ev);
  });
  document.addEventListener("mousemove", function (ev) {
    var el = ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (el) show(el, ev);
  });
  document.addEventListener("mouseout", function (ev) {
    var el = ev.target.closest ? ev.target.closest("[data-tip]") : null;
    if (el && tip && !(ev.relatedTarget && el.contains(ev.relatedTarget))) tip.hidden = true;
  });
})();

/* ---------------------------------------------------------------- contexts */
/* One context: tokens shaded by the feature's code (orange; the active token outlined), and for a TRSAE a
   second strip shaded by the attention weight its context read gave each earlier token (blue). */
TRSAE.contextHTML = function (c, vmax) {
  var h = '<div class="ctx"><div class="body"><div class="toks">';
  for (var i = 0; i < c.tok.length; i++) {
    var v = c.act[i], a = vmax > 0 ? Math.min(Math.max(v / vmax, 0), 1) : 0;
    var tip = JSON.stringify(c.tok[i]) + " \u2192 " + TRSAE.fmt(v);
    h += '<span class="tok' + (i === c.i ? " here" : "") + '" style="background:rgba(255,130,0,' +
      a.toFixed(2) + ')" title="' + TRSAE.esc(TRSAE.fmt(v)) + '" data-tip="' + TRSAE.esc(tip) + '">' +
      TRSAE.esc(TRSAE.tokText(c.tok[i])) + "</span>";
  }
  h += "</div>";
  if (c.attn) {
    var amax = Math.max.apply(null, c.attn.concat([1e-9]));
    h += '<div class="toks attn">';
    for (var j = 0; j < c.tok.length; j++) {
      var w = c.attn[j], s = w / amax;
      h += '<span class="tok' + (j === c.i ? " here" : "") + '" style="background:rgba(40,110,230,' +
        s.toFixed(2) + ')" title="attention ' + TRSAE.fmt(w) + '" data-tip="' +
        TRSAE.esc("attention from the active token: " + TRSAE.fmt(w)) + '">' +
        TRSAE.esc(TRSAE.tokText(c.tok[j])) + "</span>";
    }
    h += "</div>";
  }
  h += '<div class="where">sequence ' + c.seq + ", position " + c.t + "</div></div>";
  return h + (c.terms ? TRSAE.termsSVG(c.terms, 220, 14) : "") + "</div>";
};

/* ---------------------------------------------------------------- inline SVG plots */
TRSAE.svg = function (w, h, body, cls) {
  return '<svg class="' + (cls || "plot") + '" width="' + w + '" height="' + h + '" viewBox="0 0 ' + w + " " + h +
    '" xmlns="http://www.w3.org/2000/svg">' + body + "</svg>";
};

/* Histogram of counts in equal bins over (0, max]. */
TRSAE.histSVG = function (counts, vmax, w, h) {
  var n = counts.length, top = Math.max.apply(null, counts.concat([1])), bw = (w - 40) / n, b = "";
  for (var i = 0; i < n; i++) {
    var bh = (h - 24) * counts[i] / top, lo = vmax * i / n, hi = vmax * (i + 1) / n;
    b += '<rect x="' + (36 + i * bw).toFixed(1) + '" y="' + (h - 16 - bh).toFixed(1) + '" width="' +
      Math.max(bw - 1, 1).toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="#e8871e" data-tip="' +
      TRSAE.fmt(lo) + "\u2013" + TRSAE.fmt(hi) + ": " + counts[i] + '"><title>' + counts[i] + "</title></rect>";
  }
  b += '<text x="36" y="' + (h - 3) + '">0</text><text x="' + (w - 4) + '" y="' + (h - 3) +
    '" text-anchor="end">' + TRSAE.fmt(vmax) + '</text><text x="32" y="12" text-anchor="end">' + top + "</text>";
  return TRSAE.svg(w, h, b);
};

/* Line of ys over xs (positions), with the y range 0 .. max. */
TRSAE.lineSVG = function (xs, ys, w, h, color, label) {
  var n = ys.length, top = Math.max.apply(null, ys.concat([1e-12])), pts = [];
  for (var i = 0; i < n; i++) {
    pts.push((36 + (w - 44) * (n > 1 ? i / (n - 1) : 0)).toFixed(1) + "," + (h - 16 - (h - 24) * ys[i] / top).toFixed(1));
  }
  var b = '<polyline fill="none" stroke="' + color + '" stroke-width="1.5" points="' + pts.join(" ") + '"/>';
  for (var j = 0; j < n; j++) {
    var p = pts[j].split(",");
    b += '<circle cx="' + p[0] + '" cy="' + p[1] + '" r="2" fill="' + color + '" data-tip="position ' + xs[j] +
      ": " + TRSAE.fmt(ys[j]) + '"/>';
  }
  b += '<text x="36" y="' + (h - 3) + '">' + xs[0] + '</text><text x="' + (w - 8) + '" y="' + (h - 3) +
    '" text-anchor="end">' + xs[n - 1] + '</text><text x="32" y="12" text-anchor="end">' + TRSAE.fmt(top) +
    '</text><text x="' + (w / 2) + '" y="12" text-anchor="middle">' + TRSAE.esc(label) + "</text>";
  return TRSAE.svg(w, h, b);
};

/* Signed horizontal bars of the token / position / context terms of a pre-activation. */
TRSAE.TERMS = [["token", "#7a7a7a"], ["position", "#2e9e5b"], ["context", "#286ee6"]];
TRSAE.termsSVG = function (terms, w, rowh) {
  var m = Math.max.apply(null, terms.map(Math.abs).concat([1e-12])), mid = 70 + (w - 70) / 2, b = "";
  for (var i = 0; i < 3; i++) {
    var len = ((w - 70) / 2 - 2) * Math.abs(terms[i]) / m, x = terms[i] >= 0 ? mid : mid - len;
    b += '<text x="0" y="' + (i * rowh + rowh - 3) + '">' + TRSAE.TERMS[i][0] + " " + TRSAE.fmt(terms[i]) + "</text>" +
      '<rect x="' + x.toFixed(1) + '" y="' + (i * rowh + 2) + '" width="' + len.toFixed(1) + '" height="' +
      (rowh - 4) + '" fill="' + TRSAE.TERMS[i][1] + '" data-tip="' + TRSAE.TERMS[i][0] + " term: " +
      TRSAE.fmt(terms[i]) + '"/>';
  }
  b += '<line x1="' + mid + '" x2="' + mid + '" y1="0" y2="' + 3 * rowh + '" stroke="#444"/>';
  return TRSAE.svg(w, 3 * rowh, b, "terms");
};

/* A heat strip: one cell per value, shaded by |value| (blue positive, red negative), tips from labels. */
TRSAE.stripSVG = function (vals, labels, w, h) {
  var m = Math.max.apply(null, vals.map(Math.abs).concat([1e-12])), cw = w / Math.max(vals.length, 1), b = "";
  for (var i = 0; i < vals.length; i++) {
    var a = (Math.abs(vals[i]) / m).toFixed(2), col = vals[i] >= 0 ? "40,110,230" : "220,60,60";
    b += '<rect x="' + (i * cw).toFixed(1) + '" y="0" width="' + Math.max(cw - 1, 1).toFixed(1) + '" height="' + h +
      '" fill="rgba(' + col + "," + a + ')" stroke="#ddd" data-tip="' + TRSAE.esc(labels[i] + ": " +
      TRSAE.fmt(vals[i])) + '"/>';
  }
  return TRSAE.svg(w, h, b, "strip");
};

/* Load a data script (works from file://, where fetch does not). */
TRSAE.load = function (src, onerror) {
  var s = document.createElement("script");
  s.src = src;
  s.onerror = onerror || null;
  document.body.appendChild(s);
};
