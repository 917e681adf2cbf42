/* The feature table: sort by a column (click its header), filter by density and a search over id, label and
   top tokens, 100 rows a page. data/index.js calls TRSAE.index(data). */
"use strict";

TRSAE.PAGE = 100;

TRSAE.index = function (data) {
  var col = {};
  data.columns.forEach(function (c, i) { col[c] = i; });
  var rows = data.rows;
  var state = {sort: "id", desc: false, page: 0, view: rows};
  var table = document.getElementById("features"), tbody = table.tBodies[0];
  var el = function (id) { return document.getElementById(id); };

  function keyOf(r, c) {
    var v = r[col[c]];
    return v === null || v === undefined ? (typeof rows[0][col[c]] === "string" ? "" : -Infinity) : v;
  }

  function apply() {
    var q = el("q").value.trim().toLowerCase();
    var dmin = parseFloat(el("dmin").value), dmax = parseFloat(el("dmax").value), alive = el("alive").checked;
    var view = rows.filter(function (r) {
      var d = r[col.density];
      if (alive && !(d > 0)) return false;
      if (!isNaN(dmin) && d < dmin) return false;
      if (!isNaN(dmax) && d > dmax) return false;
      if (!q) return true;
      if (/^#?\d+$/.test(q)) return String(r[col.id]) === q.replace("#", "");
      var label = r[col.label] || "", toks = r[col.top_tokens] || "";
      return (label + " " + toks).toLowerCase().indexOf(q) >= 0;
    });
    var c = state.sort, sign = state.desc ? -1 : 1;
    view.sort(function (a, b) {
      var x = keyOf(a, c), y = keyOf(b, c);
      if (x < y) return -sign;
      if (x > y) return sign;
      return a[col.id] - b[col.id];
    });
    state.view = view;
    state.page = Math.min(state.page, Math.max(Math.ceil(view.length / TRSAE.PAGE) - 1, 0));
    render();
  }

  function cell(r, c) {
    var v = r[col[c]], E = TRSAE.esc;
    if (c === "id") return '<a href="feature.html#' + v + '">#' + v + "</a>";
    if (c === "match_cos") {
      if (r[col.match] === null) return "";
      return '<a href="../' + E(data.other) + "/feature.html#" + r[col.match] + '">#' + r[col.match] + "</a> (" +
        TRSAE.fmt(v) + ")";
    }
    if (c === "density") return '<span class="bar" style="width:' + Math.round(60 * Math.min(Math.sqrt(v) / 0.5, 1)) +
      'px"></span>' + TRSAE.fmt(v);
    return E(TRSAE.fmt(v));
  }

  var shown = [].map.call(table.tHead.rows[0].cells, function (th) { return th.getAttribute("data-col"); });

  function render() {
    var start = state.page * TRSAE.PAGE, page = state.view.slice(start, start + TRSAE.PAGE), html = [];
    for (var i = 0; i < page.length; i++) {
      html.push("<tr>" + shown.map(function (c) { return "<td>" + cell(page[i], c) + "</td>"; }).join("") + "</tr>");
    }
    tbody.innerHTML = html.join("");
    var n = state.view.length, pages = Math.max(Math.ceil(n / TRSAE.PAGE), 1);
    el("count").textContent = n + " of " + rows.length + " features";
    el("pager").innerHTML = '<button id="pprev"' + (state.page ? "" : " disabled") + ">‹</button> page " +
      (state.page + 1) + " of " + pages + ' <button id="pnext"' + (state.page + 1 < pages ? "" : " disabled") +
      ">›</button>";
    el("pprev").onclick = function () { state.page--; render(); };
    el("pnext").onclick = function () { state.page++; render(); };
    [].forEach.call(table.tHead.rows[0].cells, function (th) {
      th.className = th.getAttribute("data-col") === state.sort ? (state.desc ? "desc" : "asc") : "";
    });
  }

  [].forEach.call(table.tHead.rows[0].cells, function (th) {
    th.addEventListener("click", function () {
      var c = th.getAttribute("data-col");
      if (c === state.sort) state.desc = !state.desc;
      else { state.sort = c; state.desc = c !== "id" && c !== "label" && c !== "top_tokens"; }
      state.page = 0;
      apply();
    });
  });
  ["q", "dmin", "dmax", "alive"].forEach(function (id) {
    el(id).addEventListener("input", function () { state.page = 0; apply(); });
  });
  apply();
  document.body.setAttribute("data-ready", String(performance.now()));
  TRSAE.indexState = state;
};
