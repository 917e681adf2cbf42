/* A feature's page (feature.html#<id>) and the side-by-side page (compare.html#<sae>=<id>&<sae>=<id>).
   Each data/f/<id>.js calls TRSAE.feature(record). */
"use strict";

TRSAE.renderFeature = function (rec, box, up) {
  var E = TRSAE.esc, F = TRSAE.fmt, h = [];
  h.push('<h1>Feature #' + rec.f + ' <small>' + E(rec.sae) + "</small></h1>");
  h.push('<p class="stats">density ' + F(rec.density) + " · active on " + rec.n_active + " tokens · max " +
    F(rec.max) + "</p>");
  if (rec.labels.length) {
    h.push('<p class="labels">labels: ' + rec.labels.map(function (l) {
      return "<b>" + E(l[0]) + "</b> (F1 " + F(l[1]) + ")";
    }).join(", ") + "</p>");
  }
  h.push('<div class="row">');
  h.push('<section><h2>Activations</h2>' + TRSAE.histSVG(rec.hist.counts, rec.hist.max, 300, 110) + "</section>");
  h.push('<section><h2>Against position</h2>' +
    TRSAE.lineSVG(rec.pos.start, rec.pos.mean, 300, 110, "#e8871e", "mean code") +
    TRSAE.lineSVG(rec.pos.start, rec.pos.rate, 300, 110, "#555", "firing rate") + "</section>");
  if (rec.logits) {
    var lt = function (xs, cls) {
      return '<table class="logits ' + cls + '">' + xs.map(function (x) {
        return "<tr><td><code>" + E(TRSAE.tokText(x[0])) + "</code></td><td>" + F(x[1]) + "</td></tr>";
      }).join("") + "</table>";
    };
    h.push('<section><h2>Decoder direction → logits</h2><div class="row">' + lt(rec.logits.top, "pos") +
      lt(rec.logits.bottom, "neg") + "</div></section>");
  }
  h.push("</div>");
  if (rec.temporal) h.push(TRSAE.temporalHTML(rec.temporal, (TRSAE.buckets || {})[rec.sae] || []));
  var ctxs = function (cs) { return cs.map(function (c) { return TRSAE.contextHTML(c, rec.max); }).join(""); };
  h.push('<section class="contexts"><h2>Top contexts</h2>' + (rec.top.length ? ctxs(rec.top) :
    '<p class="note">never active on the collected tokens</p>') + "</section>");
  if (rec.bands.length) {
    h.push('<section class="contexts"><h2>Samples by activation quantile</h2>' + rec.bands.slice().reverse().map(
      function (b) { return "<h3>" + E(b.band) + " of its activations</h3>" + ctxs(b.ctx); }).join("") + "</section>");
  }
  h.push('<section><h2>Nearest decoder directions</h2><p class="nbrs">' + rec.nbrs.map(function (n) {
    return '<a href="' + up + E(rec.sae) + "/feature.html#" + n[0] + '">#' + n[0] + "</a> " + F(n[1]);
  }).join(" · ") + "</p>");
  if (rec.match) {
    h.push('<p class="match">best match in ' + E(rec.other) + ': <a href="' + up + E(rec.other) +
      "/feature.html#" + rec.match[0] + '">#' + rec.match[0] + "</a> (cosine " + F(rec.match[1]) + ') · <a href="' +
      up + "compare.html#" + E(rec.sae) + "=" + rec.f + "&amp;" + E(rec.other) + "=" + rec.match[0] +
      '">side by side</a></p>');
  }
  h.push("</section>");
  box.innerHTML = h.join("");
};

TRSAE.temporalHTML = function (t, buckets) {
  var F = TRSAE.fmt, h = ['<section class="temporal"><h2>Temporal terms</h2>'];
  h.push("<p>context strength g‖U‖/‖W<sub>enc</sub>‖ " + F(t.ctx_strength) + " · positional strength " +
    "max|P|/‖W<sub>enc</sub>‖ " + F(t.pos_strength) + " · window " + t.window + "</p>");
  h.push('<div class="row"><div><h3>mean pre-activation terms where active</h3>' +
    TRSAE.termsSVG(t.mean_terms, 300, 18) + "</div>");
  if (t.P.length) {
    var labels = t.P.map(function (_, i) {
      var b = buckets[i] || [-1, -1];
      return "bucket " + i + " (positions " + (b[0] < 0 ? "none" : b[0] + (b[1] < 0 ? "+" : "\u2013" + b[1])) + ")";
    });
    h.push("<div><h3>position embedding P[f, bucket]</h3>" + TRSAE.stripSVG(t.P, labels, 320, 18) + "</div>");
  }
  h.push('</div><p class="note">Each context below shows the code (orange), the attention weight of the ' +
    "active token's context read on each earlier token (blue strip) and that token's three terms.</p></section>");
  return h.join("");
};

TRSAE.featurePage = function (width) {
  var box = document.getElementById("feature");
  function id() {
    var v = parseInt(location.hash.replace(/^#f?=?/, ""), 10);
    return isNaN(v) ? 0 : Math.min(Math.max(v, 0), width - 1);
  }
  TRSAE.feature = function (rec) {
    if (rec.f !== id()) return;
    TRSAE.renderFeature(rec, box, "../");
    document.getElementById("crumb").textContent = "#" + rec.f;
    document.title = box.getAttribute("data-sae") + " #" + rec.f;
    document.body.setAttribute("data-ready", String(performance.now()));
  };
  function show() {
    var f = id();
    document.getElementById("prev").href = "#" + Math.max(f - 1, 0);
    document.getElementById("next").href = "#" + Math.min(f + 1, width - 1);
    document.body.removeAttribute("data-ready");
    TRSAE.load("data/f/" + f + ".js", function () {
      box.innerHTML = '<p class="error">no data for feature #' + f + "</p>";
    });
  }
  window.addEventListener("hashchange", show);
  show();
};

TRSAE.comparePage = function (names) {
  function wanted() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var p = kv.split("=");
      if (p.length === 2) out[decodeURIComponent(p[0])] = parseInt(p[1], 10) || 0;
    });
    names.forEach(function (n, i) {
      if (!(n in out)) out[n] = i === 0 && "a" in out ? out.a : i === 1 && "b" in out ? out.b : 0;
    });
    return out;
  }
  TRSAE.feature = function (rec) {
    var i = names.indexOf(rec.sae);
    if (i < 0 || wanted()[rec.sae] !== rec.f) return;
    TRSAE.renderFeature(rec, document.getElementById("side" + i), "");
    document.body.setAttribute("data-ready", String(performance.now()));
  };
  function show() {
    var w = wanted();
    names.forEach(function (n, i) {
      document.getElementById("pick" + i).value = w[n];
      TRSAE.load(n + "/data/f/" + w[n] + ".js");
    });
  }
  document.getElementById("go").addEventListener("click", function () {
    location.hash = names.map(function (n, i) {
      return encodeURIComponent(n) + "=" + document.getElementById("pick" + i).value;
    }).join("&");
  });
  window.addEventListener("hashchange", show);
  show();
};
