/* vllm-seqroute routing dashboard: polls the stats route of this server and draws a
 * per-layer x expert load heatmap (canvas) and an experts-per-token histogram (SVG).
 * No external resources; all text goes through textContent. */
(function () {
  'use strict';
  var cfg = window.SEQROUTE_CONFIG || {};
  var statsPath = cfg.statsPath || 'v1/routing/stats';
  var params = new URLSearchParams(window.location.search);
  var KEY_COOKIE = 'seqroute_api_key';
  var apiKey = params.get('api_key') || readKeyCookie();
  if (params.has('api_key')) {
    // first load with ?api_key=KEY: keep the key in a session cookie for this page's path (the
    // server checks it on reload) and take it out of the address bar and the history entry
    if (apiKey) { storeKeyCookie(apiKey); }
    params.delete('api_key');
    var rest = params.toString();
    history.replaceState(null, '', window.location.pathname + (rest ? '?' + rest : '') + window.location.hash);
  }
  var SVG_NS = 'http://www.w3.org/2000/svg';

  var el = function (id) { return document.getElementById(id); };
  var body = document.body;
  var statusEl = el('status');
  var timer = null;
  var inFlight = false;
  var last = null;      // last good response
  var previous = null;  // the one before (for the "recent" window)
  var updates = 0;

  el('stats-path').textContent = '/' + statsPath;
  var refreshSel = el('refresh');
  var wanted = String(params.get('refresh') || cfg.refreshSeconds || 3);
  if (Array.prototype.some.call(refreshSel.options, function (o) { return o.value === wanted; })) {
    refreshSel.value = wanted;
  }

  function readKeyCookie() {
    var found = document.cookie.split('; ').filter(function (c) { return c.indexOf(KEY_COOKIE + '=') === 0; })[0];
    if (!found) { return ''; }
    try { return decodeURIComponent(found.slice(KEY_COOKIE.length + 1)); } catch (e) { return ''; }
  }
  function storeKeyCookie(key) {
    document.cookie = KEY_COOKIE + '=' + encodeURIComponent(key) + '; path=' + window.location.pathname +
      '; SameSite=Strict';
  }
  el('key-button').addEventListener('click', function () {
    // forget the key and reload: the server then asks for one
    document.cookie = KEY_COOKIE + '=; path=' + window.location.pathname + '; Max-Age=0; SameSite=Strict';
    window.location.reload();
  });

  function setState(state, text) {
    body.dataset.state = state;
    statusEl.className = 'status ' + (state === 'error' ? 'error' : state === 'ok' ? 'ok' : '');
    statusEl.textContent = text;
    el('charts').classList.toggle('stale', state === 'error');
  }

  function schedule() {
    if (timer) { clearTimeout(timer); timer = null; }
    var s = Number(refreshSel.value);
    if (s > 0) { timer = setTimeout(refresh, s * 1000); }
  }

  async function refresh() {
    if (inFlight) { return; }
    inFlight = true;
    try {
      await poll();
    } finally {
      inFlight = false;
      schedule();
    }
  }

  async function poll() {
    var headers = { 'Accept': 'application/json' };
    if (apiKey) { headers['Authorization'] = 'Bearer ' + apiKey; }
    var res;
    try {
      res = await fetch(statsPath + '?requests=false', { headers: headers, cache: 'no-store',
                                                         credentials: 'same-origin' });
    } catch (e) {
      return fail('network error (' + (e && e.message ? e.message : 'fetch failed') + ')');
    }
    if (!res.ok) {
      var detail = res.statusText || '';
      try {
        var j = await res.json();
        if (j && j.error) { detail = typeof j.error === 'string' ? j.error : (j.error.message || detail); }
      } catch (e) { /* not JSON */ }
      var hint = res.status === 401 ? ' (the API key was not accepted)' : '';
      el('key-button').hidden = res.status !== 401;
      return fail('HTTP ' + res.status + (detail ? ': ' + detail : '') + hint);
    }
    el('key-button').hidden = true;
    var data;
    try { data = await res.json(); } catch (e) { return fail('bad response (not JSON)'); }
    previous = last;
    last = data;
    updates += 1;
    body.dataset.updates = String(updates);
    var shown = render();
    if (shown === null) {
      setState('off', 'Routing is off on this server (start it with --routing on a MoE model)');
    } else {
      var when = new Date((last.time || Date.now() / 1000) * 1000).toLocaleTimeString();
      setState('ok', 'live · updated ' + when + ' · ' + shown + ' token decisions in view');
    }
  }

  function fail(message) {
    setState('error', 'Stats unavailable: ' + message + ' · showing the last data received' +
             (last ? '' : ' (none yet)') + ' · retrying');
  }

  // ---- data -------------------------------------------------------------------------
  function sub(a, b) {  // element-wise a - b over (nested) arrays
    if (Array.isArray(a)) { return a.map(function (x, i) { return sub(x, b ? b[i] : undefined); }); }
    return a - (b || 0);
  }
  function anyNegative(a) {
    if (Array.isArray(a)) { return a.some(anyNegative); }
    return a < 0;
  }
  function view() {
    if (!last || !last.enabled) { return null; }
    var keys = ['tokens_by_policy', 'pairs_by_policy', 'granted_by_policy', 'expert_load',
                'experts_per_token', 'experts_touched', 'steps_routed'];
    var out = { policies: last.policies || [] };
    var recent = el('window').value === 'recent' && previous && previous.enabled;
    var diff = {};
    keys.forEach(function (k) { diff[k] = recent ? sub(last[k] || [], previous[k] || []) : last[k] || []; });
    if (recent && keys.some(function (k) { return anyNegative(diff[k]); })) {
      keys.forEach(function (k) { diff[k] = last[k] || []; });  // counters were reset in between
    }
    keys.forEach(function (k) { out[k] = diff[k]; });
    return out;
  }
  function sum(a) { return a.reduce(function (s, x) { return s + x; }, 0); }

  // ---- rendering --------------------------------------------------------------------
  // Draws the last data; returns the token decisions in view (null: routing is off).
  function render() {
    if (!last || !last.enabled) { return null; }
    var info = last.info || {};
    el('server-info').textContent = '· ' + (info.base ? info.base.policy : '?') + ' server, ' +
      (info.num_layers || 0) + ' MoE layers × ' + (info.num_experts || 0) + ' experts, model K=' +
      (info.model_k || '?') + ', width ' + (info.width || '?');
    var v = view();
    syncLayerSelect(v.expert_load.length);
    var tokens = sum(v.tokens_by_policy || []);
    drawHeatmap(v.expert_load);
    drawHistogram(v.experts_per_token);
    drawTouched(v);
    drawPolicies(v);
    drawElastic(last.elastic);
    return tokens;
  }

  // ---- elastic budget -----------------------------------------------------------------
  function num(x) { return typeof x === 'number' && isFinite(x); }
  function fmt(x, digits) { return num(x) ? x.toFixed(digits) : '–'; }
  function span(id, text) {
    var s = document.createElement('span');
    s.id = id;
    s.textContent = text;
    return s;
  }

  // The controller's state (null: off): the current budget and reason in words, and its trace
  // [[unix s, budget, tpot ms | null, running, waiting], ...] as budget and TPOT against time.
  function drawElastic(e) {
    var on = !!e && typeof e === 'object';
    var now = el('elastic-now');
    el('elastic-panel').dataset.state = on ? 'on' : 'off';
    el('elastic-wrap').hidden = !on;
    el('elastic-legend').hidden = !on;
    while (now.firstChild) { now.removeChild(now.firstChild); }
    if (!on) {
      now.textContent = 'controller off (with --routing-slo-tpot-ms the server lowers the budget of ' +
        'requests that name none to hold that time per output token, and gives it back when load falls)';
      el('elastic-note').textContent = '';
      return;
    }
    now.appendChild(document.createTextNode('budget now '));
    now.appendChild(span('elastic-budget', fmt(e.budget, 2)));
    now.appendChild(document.createTextNode(' (min ' + fmt(e.min, 2) + ', ceiling ' + fmt(e.ceiling, 2) +
      ') · TPOT ' + fmt(e.tpot_ms, 1) + ' ms, target ' + fmt(e.target_tpot_ms, 1) + ' ms' +
      (num(e.target_ttft_ms) ? ' (TTFT target ' + fmt(e.target_ttft_ms, 0) + ' ms)' : '') +
      ' · running ' + (num(e.running) ? e.running : '–') + ', waiting ' + (num(e.waiting) ? e.waiting : '–') +
      ' · reason: '));
    now.appendChild(span('elastic-reason', String(e.reason || '–')));
    var trace = (Array.isArray(e.trace) ? e.trace : []).filter(function (p) {
      return Array.isArray(p) && num(p[0]) && num(p[1]);
    });
    var root = el('elastic'), H = 220, W = canvas(root, 'elastic-panel', H);
    var left = 44, right = 56, top = 14, bottom = 30, plotW = W - left - right, plotH = H - top - bottom;
    var t0 = trace.length ? trace[0][0] : 0, t1 = trace.length ? trace[trace.length - 1][0] : 1;
    var dt = Math.max(t1 - t0, 1);
    var bTop = Math.max(num(e.ceiling) ? e.ceiling : 0, Math.max.apply(null, trace.map(function (p) { return p[1]; }).concat([1])));
    var tpots = trace.filter(function (p) { return num(p[2]); }).map(function (p) { return p[2]; });
    var target = num(e.target_tpot_ms) ? e.target_tpot_ms : 0;
    var tTop = Math.max(target * 1.5, Math.max.apply(null, tpots.concat([1]))) * 1.05;
    var x = function (t) { return left + plotW * (t - t0) / dt; };
    var yb = function (b) { return top + plotH * (1 - b / bTop); };
    var yt = function (ms) { return top + plotH * (1 - Math.min(ms, tTop) / tTop); };
    root.appendChild(svg('line', { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, 'class': 'axis' }));
    root.appendChild(svg('line', { x1: left, y1: top, x2: left, y2: H - bottom, 'class': 'axis' }));
    root.appendChild(svg('line', { x1: W - right, y1: top, x2: W - right, y2: H - bottom, 'class': 'axis' }));
    [['min', e.min], ['ceiling', e.ceiling]].forEach(function (g) {
      if (!num(g[1])) { return; }
      root.appendChild(svg('line', { x1: left, y1: yb(g[1]), x2: W - right, y2: yb(g[1]), 'class': 'grid' }));
      root.appendChild(svg('text', { x: left - 4, y: yb(g[1]) + 4, 'text-anchor': 'end' }, fmt(g[1], 1)));
    });
    root.appendChild(svg('text', { x: left - 4, y: H - bottom + 4, 'text-anchor': 'end' }, '0'));
    root.appendChild(svg('text', { x: 4, y: H - 4 }, 'budget'));
    if (target) {
      root.appendChild(svg('line', { x1: left, y1: yt(target), x2: W - right, y2: yt(target), 'class': 'target' }));
      root.appendChild(svg('text', { x: W - right + 4, y: yt(target) + 4 }, fmt(target, 0) + ' ms'));
    }
    root.appendChild(svg('text', { x: W - right + 4, y: top + 8 }, fmt(tTop, 0) + ' ms'));
    root.appendChild(svg('text', { x: W - 4, y: H - 4, 'text-anchor': 'end' }, 'TPOT'));
    if (trace.length) {
      root.appendChild(svg('text', { x: left, y: H - bottom + 14 }, new Date(t0 * 1000).toLocaleTimeString()));
      root.appendChild(svg('text', { x: W - right, y: H - bottom + 14, 'text-anchor': 'end' },
                           new Date(t1 * 1000).toLocaleTimeString()));
    }
    // the budget holds from one trace point to the next: a step line
    var pts = [];
    trace.forEach(function (p, i) {
      if (i) { pts.push(x(p[0]).toFixed(1) + ',' + yb(trace[i - 1][1]).toFixed(1)); }
      pts.push(x(p[0]).toFixed(1) + ',' + yb(p[1]).toFixed(1));
    });
    if (pts.length) {
      var line = svg('polyline', { points: pts.join(' '), 'class': 'budget' });
      line.appendChild(svg('title', {}, 'budget: ' + trace.map(function (p) { return fmt(p[1], 2); }).join(' → ')));
      root.appendChild(line);
    }
    // TPOT: one line per run of measured points (null: no decode step to measure)
    var run = [];
    var flush = function () {
      if (run.length === 1) { root.appendChild(svg('circle', { cx: run[0][0], cy: run[0][1], r: 2, 'class': 'tpot' })); }
      if (run.length > 1) {
        root.appendChild(svg('polyline', { points: run.map(function (q) { return q[0].toFixed(1) + ',' + q[1].toFixed(1); }).join(' '),
                                           'class': 'tpot' }));
      }
      run = [];
    };
    trace.forEach(function (p) { if (num(p[2])) { run.push([x(p[0]), yt(p[2])]); } else { flush(); } });
    flush();
    root.dataset.points = String(trace.length);
    root.dataset.tpotPoints = String(tpots.length);
    root.dataset.budget = num(e.budget) ? String(e.budget) : '';
    el('elastic-note').textContent = trace.length ? '(' + trace.length + ' point' + (trace.length === 1 ? '' : 's') +
      ' over ' + Math.round(t1 - t0) + ' s)' : '(no trace yet)';
  }

  function syncLayerSelect(n) {
    var sel = el('layer');
    if (sel.options.length === n + 1) { return; }
    var keep = sel.value;
    while (sel.options.length > 1) { sel.remove(1); }
    for (var i = 0; i < n; i++) {
      var o = document.createElement('option');
      o.value = String(i);
      o.textContent = 'layer ' + i;
      sel.appendChild(o);
    }
    sel.value = Number(keep) < n ? keep : 'all';
  }

  var STOPS = [[-1, [44, 123, 182]], [0, [247, 247, 247]], [1, [215, 25, 28]]];
  var NO_PAIRS = 'rgb(58,63,71)';   // an expert with 0 pairs in its layer (the legend's "0 pairs")
  var NO_TOKENS = 'rgb(220,223,228)';  // a layer with no tokens in view
  // t = log4(load / even load), clipped to [-1, 1]: blue (<= 1/4 of even) .. white (even) .. red (>= 4x)
  function colour(t) {
    t = Math.max(-1, Math.min(1, t));
    var a = t < 0 ? STOPS[0] : STOPS[1];
    var b = t < 0 ? STOPS[1] : STOPS[2];
    var f = (t - a[0]) / (b[0] - a[0]);
    var c = a[1].map(function (x, i) { return Math.round(x + f * (b[1][i] - x)); });
    return 'rgb(' + c[0] + ',' + c[1] + ',' + c[2] + ')';
  }

  var heat = { cells: [], geom: null };
  function drawHeatmap(load) {
    var canvas = el('heatmap');
    var L = load.length;
    var E = L ? Math.max.apply(null, load.map(function (r) { return r.length; })) : 0;
    var left = 64, top = 22, avail = Math.max(320, el('heatmap-wrap').clientWidth - left - 8);
    var cw = Math.max(4, Math.min(32, Math.floor(avail / Math.max(E, 1))));
    var ch = Math.max(6, Math.min(28, Math.floor(360 / Math.max(L, 1))));
    canvas.width = left + cw * Math.max(E, 1) + 8;
    canvas.height = top + ch * Math.max(L, 1) + 6;
    var ctx = canvas.getContext('2d');
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = '#1d2330';
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    var step = Math.ceil(24 / cw);
    ctx.textAlign = 'center';
    for (var e = 0; e < E; e += step) { ctx.fillText(String(e), left + e * cw + cw / 2, top / 2); }
    ctx.textAlign = 'right';
    var lstep = Math.ceil(12 / ch);
    var drawn = 0, total = 0, unused = 0;
    for (var l = 0; l < L; l++) {
      if (l % lstep === 0) {
        ctx.fillStyle = '#1d2330';
        ctx.fillText('layer ' + l, left - 6, top + l * ch + ch / 2);
      }
      var row = load[l], rowSum = sum(row);
      total += rowSum;
      for (e = 0; e < row.length; e++) {
        var fill;
        if (rowSum <= 0) {
          fill = NO_TOKENS;
        } else {
          var r = row[e] * row.length / rowSum;
          fill = r <= 0 ? NO_PAIRS : colour(Math.log2(r) / 2);
          if (r <= 0) { unused += 1; }
        }
        ctx.fillStyle = fill;
        ctx.fillRect(left + e * cw, top + l * ch, cw - (cw > 6 ? 1 : 0), ch - (ch > 6 ? 1 : 0));
        drawn += 1;
      }
    }
    heat.cells = load;
    heat.geom = { left: left, top: top, cw: cw, ch: ch, L: L, E: E };
    canvas.dataset.cells = String(drawn);
    canvas.dataset.total = String(total);
    canvas.dataset.unused = String(unused);
    canvas.dataset.geom = JSON.stringify(heat.geom);
    el('heatmap-note').textContent = total ? '· ' + total + ' (token, expert) pairs; ' + unused +
      ' expert' + (unused === 1 ? '' : 's') + ' with 0 pairs' : '· no routed tokens in view';
  }

  function heatTip(ev) {
    var tip = el('heatmap-tip'), g = heat.geom;
    if (!g) { return; }
    var rect = el('heatmap').getBoundingClientRect();
    var x = ev.clientX - rect.left, y = ev.clientY - rect.top;
    var e = Math.floor((x - g.left) / g.cw), l = Math.floor((y - g.top) / g.ch);
    if (e < 0 || l < 0 || l >= g.L || e >= (heat.cells[l] || []).length) { tip.hidden = true; return; }
    var row = heat.cells[l], n = row[e], s = sum(row);
    tip.textContent = 'layer ' + l + ', expert ' + e + ': ' + n + ' pairs' +
      (s ? ' (' + (100 * n / s).toFixed(1) + '% of the layer, ' + (n * row.length / s).toFixed(2) + '× even load)' : '');
    tip.style.left = (x + 12) + 'px';
    tip.style.top = (y + 12) + 'px';
    tip.hidden = false;
  }

  function drawLegend() {
    var c = el('legend-bar'), ctx = c.getContext('2d');
    for (var i = 0; i < c.width; i++) {
      ctx.fillStyle = colour(-1 + 2 * i / (c.width - 1));
      ctx.fillRect(i, 0, 1, c.height);
    }
  }

  function svg(tag, attrs, text) {
    var n = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs).forEach(function (k) { n.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { n.textContent = text; }
    return n;
  }

  function drawHistogram(perLayer) {
    var sel = el('layer').value;
    var counts = [];
    perLayer.forEach(function (row, l) {
      if (sel !== 'all' && Number(sel) !== l) { return; }
      row.forEach(function (c, k) { counts[k] = (counts[k] || 0) + c; });
    });
    for (var k = 0; k < counts.length; k++) { counts[k] = counts[k] || 0; }
    var root = el('histogram'), H = 240, W = canvas(root, 'histogram-panel', H);
    var left = 44, right = 12, top = 26, bottom = 36;
    var n = Math.max(counts.length, 1), total = sum(counts);
    var peak = Math.max.apply(null, counts.concat([1]));
    var bw = (W - left - right) / n;
    root.appendChild(svg('line', { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, 'class': 'axis' }));
    root.appendChild(svg('line', { x1: left, y1: top, x2: left, y2: H - bottom, 'class': 'axis' }));
    root.appendChild(svg('text', { x: 4, y: top + 8 }, total ? (100 * peak / total).toFixed(0) + '%' : ''));
    root.appendChild(svg('text', { x: W / 2, y: H - 6, 'text-anchor': 'middle' }, 'experts per token'));
    root.appendChild(svg('text', { x: 4, y: 11 }, 'share of decisions'));
    var bars = 0;
    counts.forEach(function (c, k) {
      var h = total ? (H - top - bottom) * c / peak : 0;
      var x = left + k * bw + bw * 0.12;
      var bar = svg('rect', { x: x, y: H - bottom - h, width: Math.max(1, bw * 0.76), height: h,
                              'class': 'bar', 'data-k': k, 'data-count': c });
      bar.appendChild(svg('title', {}, k + ' experts: ' + c + (total ? ' (' + (100 * c / total).toFixed(1) + '%)' : '')));
      root.appendChild(bar);
      if (h > 0) { bars += 1; }
      root.appendChild(svg('text', { x: left + k * bw + bw / 2, y: H - bottom + 14, 'text-anchor': 'middle' }, String(k)));
      if (c && total) {
        root.appendChild(svg('text', { x: left + k * bw + bw / 2, y: H - bottom - h - 4, 'text-anchor': 'middle' },
                             (100 * c / total).toFixed(0) + '%'));
      }
    });
    var mean = total ? counts.reduce(function (s, c, i) { return s + c * i; }, 0) / total : 0;
    if (total) {
      var mx = left + mean * bw + bw / 2;
      var line = svg('line', { x1: mx, y1: top, x2: mx, y2: H - bottom, 'class': 'mean' });
      line.appendChild(svg('title', {}, 'mean: ' + mean.toFixed(2) + ' experts per token'));
      root.appendChild(line);
      root.appendChild(svg('text', { x: mx + 4, y: top + 10, 'class': 'mean-label' }, 'mean ' + mean.toFixed(2)));
    }
    root.dataset.bars = String(bars);
    root.dataset.total = String(total);
    el('histogram-note').textContent = total
      ? '(' + (sel === 'all' ? 'all layers' : 'layer ' + sel) + ', ' + total + ' decisions, mean ' + mean.toFixed(2) + ')'
      : '(no routed tokens in view)';
  }

  // Empty an SVG for a redraw and size it to its panel's width (at most 900 px) and height H.
  function canvas(root, panelId, H) {
    while (root.firstChild) { root.removeChild(root.firstChild); }
    var W = Math.max(360, Math.min(900, el(panelId).clientWidth - 32));
    root.setAttribute('width', W);
    root.setAttribute('height', H);
    root.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    return W;
  }

  // Per layer: mean distinct experts per step (experts_touched / steps_routed) against its experts.
  function drawTouched(v) {
    var touched = v.experts_touched || [], steps = v.steps_routed || [], load = v.expert_load || [];
    var root = el('touched'), H = 200, W = canvas(root, 'touched-panel', H);
    var L = touched.length;
    var left = 44, right = 12, top = 18, bottom = 30;
    var bw = Math.min(64, (W - left - right) / Math.max(L, 1));
    var shown = 0, sumMean = 0, sumExperts = 0;
    root.appendChild(svg('line', { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, 'class': 'axis' }));
    root.appendChild(svg('text', { x: 4, y: 11 }, 'share of the layer\'s experts'));
    root.appendChild(svg('text', { x: 4, y: top + 8 }, '100%'));
    var lstep = Math.ceil(28 / Math.max(bw, 1));
    for (var l = 0; l < L; l++) {
      var E = (load[l] || []).length || 1, n = steps[l] || 0;
      var mean = n ? touched[l] / n : 0;
      var x = left + l * bw + bw * 0.12, w = Math.max(1, bw * 0.76), full = H - top - bottom;
      root.appendChild(svg('rect', { x: x, y: top, width: w, height: full, 'class': 'frame' }));
      var h = full * Math.min(1, mean / E);
      var bar = svg('rect', { x: x, y: H - bottom - h, width: w, height: h, 'class': 'bar touched',
                              'data-layer': l, 'data-mean': mean.toFixed(2), 'data-experts': E,
                              'data-steps': n });
      bar.appendChild(svg('title', {}, 'layer ' + l + ': ' + (n ? mean.toFixed(2) + ' of ' + E +
        ' experts per step (' + (100 * mean / E).toFixed(0) + '%), ' + n + ' steps' : 'no steps in view')));
      root.appendChild(bar);
      if (n && bw >= 28) {
        root.appendChild(svg('text', { x: left + l * bw + bw / 2, y: H - bottom - h - 4, 'text-anchor': 'middle' },
                             mean.toFixed(1)));
      }
      if (l % lstep === 0) {
        root.appendChild(svg('text', { x: left + l * bw + bw / 2, y: H - bottom + 14, 'text-anchor': 'middle' }, String(l)));
      }
      if (n) { shown += 1; sumMean += mean; sumExperts += E; }
    }
    root.appendChild(svg('text', { x: left + Math.max(L, 1) * bw / 2, y: H - 2, 'text-anchor': 'middle' }, 'MoE layer'));
    root.dataset.layers = String(L);
    root.dataset.shown = String(shown);
    el('touched-note').textContent = shown
      ? '(mean over ' + shown + ' layer' + (shown === 1 ? '' : 's') + ': ' + (sumMean / shown).toFixed(2) + ' of ' +
        (sumExperts / shown).toFixed(0) + ' experts per step, ' + (100 * sumMean / sumExperts).toFixed(0) + '%)'
      : '(no steps in view)';
  }

  function drawPolicies(v) {
    var tbody = el('policies').querySelector('tbody');
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    v.policies.forEach(function (p, i) {
      var t = v.tokens_by_policy[i] || 0, pairs = v.pairs_by_policy[i] || 0, g = v.granted_by_policy[i] || 0;
      if (!t) { return; }
      var tr = document.createElement('tr');
      var budgets = ((last && last.budgets_by_policy) || [])[i] || [];
      [p, t, pairs, (pairs / t).toFixed(2), g, g ? (pairs / g).toFixed(3) : '–',
       budgets.length ? budgets.join(', ') : '–'].forEach(function (x) {
        var td = document.createElement('td');
        td.textContent = String(x);
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
  }

  el('heatmap').addEventListener('mousemove', heatTip);
  el('heatmap').addEventListener('mouseleave', function () { el('heatmap-tip').hidden = true; });
  el('window').addEventListener('change', render);
  el('layer').addEventListener('change', function () { if (last && last.enabled) { drawHistogram(view().experts_per_token); } });
  refreshSel.addEventListener('change', schedule);
  window.addEventListener('resize', render);

  window.seqrouteDashboard = {
    refresh: refresh,
    setKey: function (key) { apiKey = key || ''; },
    get state() { return body.dataset.state; },
  };
  drawLegend();
  refresh();
})();
