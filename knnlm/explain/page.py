"""The explorer as one self-contained HTML file: inline CSS, JS, data and PNG plots; it fetches
nothing. The per-token data are little-endian typed arrays in base64 (about 5.3 bytes per
number), decoded once on load; the text view renders one page of PAGE_TOKENS tokens at a time,
so a page of the document stays a few thousand elements whatever the text's length."""

import base64
import html
import json
import math
import re

import numpy as np

from . import plots
from .report import TABLE_CONTEXT

PAGE_TOKENS = 2000
# What the page's compact arrays hold (uint16 context lengths, uint8 match lengths).
LIMITS = {"context": 4096, "max_ngram": 64}


def _b64(a, dtype):
    return {"dtype": dtype, "b64": base64.b64encode(np.ascontiguousarray(a, dtype=dtype).astype(
        np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()).decode("ascii")}


def _fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _prob(lp):
    p = math.exp(lp)
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _snippet(report, vocab, i, before=TABLE_CONTEXT):
    """The test text around token i: (before, target, after) strings."""
    lo = max(0, i - before)
    show = lambda ids: vocab.text(ids).replace("\n", " ↵ ")  # noqa: E731
    return show(report.tokens[lo:i]), show(report.tokens[i:i + 1]), show(report.tokens[i + 1:i + 4])


def _group_table(rows, first):
    head = (f"<tr><th>{first}</th><th>tokens</th><th>share</th><th>mean gain</th><th>total gain</th>"
            f"<th>share of total gain</th><th>ppl LM</th><th>ppl kNN-LM</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(r['group'])}</td><td>{r['tokens']:,}</td><td>{_pct(r['token_share'])}</td>"
        f"<td>{_fmt(r['mean_gain'])}</td><td>{_fmt(r['total_gain'], 1)}</td><td>{_pct(r['gain_share'])}</td>"
        f"<td>{_fmt(r['ppl_lm'], 2)}</td><td>{_fmt(r['ppl_knnlm'], 2)}</td></tr>" for r in rows)
    return f"<table class='sum'>{head}{body}</table>"


def _top_table(report, vocab, idx, cls):
    rows = []
    for i in idx:
        b, t, a = _snippet(report, vocab, i)
        rows.append(
            f"<tr class='jump' data-i='{i}'><td>{i:,}</td><td class='ctx'>{html.escape(b)} "
            f"<b>{html.escape(t)}</b> <span class='after'>{html.escape(a)}</span></td>"
            f"<td>{_prob(report.lp_lm[i])}</td><td>{_prob(report.lp_final[i])}</td>"
            f"<td>{report.gain[i]:+.3f}</td></tr>")
    head = "<tr><th>token</th><th>context <b>target</b></th><th>p_LM</th><th>p_kNN-LM</th><th>gain</th></tr>"
    return f"<table class='sum {cls}'>{head}{''.join(rows)}</table>"


def _dumbbells(report, vocab, idx):
    idx = idx[:10]
    if not idx:
        return ""
    labels = [f"#{i} {vocab.text(report.tokens[i:i + 1])[:14]}" for i in idx]
    return plots.top_dumbbells(labels, np.exp(report.lp_lm[idx]), np.exp(report.lp_final[idx]))


def _img(uri, alt):
    return f"<img alt='{html.escape(alt)}' src='{uri}'>" if uri else ""


def summaries_html(report, vocab):
    m, t = report.meta, report.tables
    helps = t["helps"]
    helps_rows = "".join(
        f"<tr><td>{r['group']}</td><td>{r['tokens']:,}</td><td>{_pct(r['token_share'])}</td>"
        f"<td>{_fmt(r['total_gain'], 1)}</td><td>{_pct(r['abs_share'])}</td></tr>" for r in helps)
    return f"""
<section id='summaries'>
<h2>Where interpolation helps and hurts</h2>
<p>Gain = log p<sub>kNN-LM</sub> &minus; log p<sub>LM</sub> of the target (nats), λ = {m['lmbda']:g}.
Total gain {m['total_gain']:+.1f} nats over {m['tokens']:,} tokens: perplexity {m['ppl_lm']:.2f} &rarr; {m['ppl_knnlm']:.2f}.</p>
<div class='pair'><table class='sum' id='helps'><tr><th></th><th>tokens</th><th>share of tokens</th>
<th>total gain (nats)</th><th>share of total |change|</th></tr>{helps_rows}</table>
{_img(plots.gain_histogram(report.gain, m['scale']), 'histogram of gains')}</div>
<h2>Largest gains</h2>
<div class='pair'>{_top_table(report, vocab, t['best'], 'best')}{_img(_dumbbells(report, vocab, t['best']), 'largest gains')}</div>
<h2>Largest losses</h2>
<div class='pair'>{_top_table(report, vocab, t['worst'], 'worst')}{_img(_dumbbells(report, vocab, t['worst']), 'largest losses')}</div>
<h2>Gain by the target's frequency in the datastore</h2>
<p>How often the target token occurs in the datastore's text ({m['datastore_size']:,} entries).</p>
<div class='pair'>{_group_table(t['frequency'], 'target count')}
{_img(plots.group_bars(t['frequency'], 'target count in the datastore'), 'gain by frequency')}</div>
<h2>Gain by the longest context n-gram found in the datastore</h2>
<p>n: the largest n such that the last n tokens of the context occur verbatim in the datastore's
text (checked up to n = {m['max_ngram']}; "{m['max_ngram']}+" is at least that). 0: even the last token
never precedes an entry.</p>
<div class='pair'>{_group_table(t['ngram'], 'n')}
{_img(plots.group_bars(t['ngram'], 'longest matching context n-gram'), 'gain by n-gram match')}</div>
</section>"""


def write(report, vocab, path, *, page_tokens=PAGE_TOKENS, title=None):
    """Write the page to `path`; returns its size in bytes."""
    m = report.meta
    title = title or f"kNN-LM explorer: {m.get('split') or m['export']}"
    data = {
        "meta": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in {**m, "page_tokens": int(page_tokens)}.items()},
        "vocab": vocab.pieces, "joiner": vocab.joiner, "newline": vocab.newline,
        "arrays": {
            "tok": _b64(report.tokens, "int32"),
            "lp_lm": _b64(report.lp_lm, "float32"),
            "lp_knn": _b64(report.lp_knn, "float32"),
            "lp_final": _b64(report.lp_final, "float32"),
            "searched": _b64(report.searched, "uint8"),
            "rank_lm": _b64(report.rank_lm, "int16"),    # <= the export's top-k
            "rank_knn": _b64(report.rank_knn, "int32"),
            "freq": _b64(report.freq, "int32"),
            "match": _b64(report.match, "uint8"),       # <= LIMITS["max_ngram"]
            "nb_id": _b64(report.nb_id, "float64" if m["datastore_size"] >= 2**31 else "int32"),
            "nb_dist": _b64(report.nb_dist, "float32"),
            "nb_q": _b64(report.nb_q, "int32"),
            "nb_clen": _b64(report.nb_clen, "uint16"),  # <= LIMITS["context"]
            "snip": _b64(report.snippets, "int32"),
        },
    }
    # "</" inside a script element would end it: JSON allows the escaped form.
    payload = json.dumps(data, allow_nan=False, default=_json_default).replace("</", "<\\/")
    notes = (f"{m['tokens']:,} tokens of {html.escape(str(m['export']))}, {page_tokens:,} per page; "
             f"datastore {html.escape(str(m['datastore']))} ({m['datastore_size']:,} entries); "
             f"k = {m['k']}, {m['k_kept']} kept in the export, the nearest {m['neighbors_shown']} shown with "
             f"{m['context']} tokens of their text; T = {m['temperature']:g}, λ = {m['lmbda']:g}")
    if m["searched"] < m["tokens"]:
        how = ("p_LM alone" if m.get("unsearched") == "lm_only"
               else "scored against RetoMaton's pointers, no search")
        notes += f"; {m['tokens'] - m['searched']:,} tokens were not searched ({how}; hatched)"
    fill = {"TITLE": html.escape(title), "NOTES": notes, "SCALE": f"{m['scale']:g}",
            "SUMMARIES": summaries_html(report, vocab), "CSS": _CSS, "JS": _JS, "DATA": payload}
    # one pass: text from the corpus never reads as a placeholder
    page = re.sub(r"%(TITLE|NOTES|SCALE|SUMMARIES|CSS|JS|DATA)%", lambda g: fill[g.group(1)], _TEMPLATE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return len(page.encode("utf-8"))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if not math.isfinite(x) else float(x)
    raise TypeError(f"cannot write {type(x)} to the page")


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222}
header{padding:8px 16px;background:#f4f4f4;border-bottom:1px solid #ddd}
header h1{font-size:18px;margin:0 0 4px}
.notes{font-size:12px;color:#555}
#layout{display:flex;align-items:flex-start}
#textcol{flex:1 1 60%;padding:8px 16px;min-width:0}
#panel{flex:0 0 38%;position:sticky;top:0;max-height:100vh;overflow:auto;border-left:1px solid #ddd;
 padding:8px 12px;font-size:13px;background:#fcfcfc}
#panel.empty{color:#777}
#nav{display:flex;gap:8px;align-items:center;margin:6px 0;flex-wrap:wrap}
#text{white-space:pre-wrap;word-wrap:break-word;font-family:Georgia,serif;font-size:15px;line-height:1.7}
.tok{cursor:pointer;border-radius:2px;padding:0 1px}
.tok.sel{outline:2px solid #000}
.tok.nosearch{background-image:repeating-linear-gradient(45deg,#ccc 0 2px,transparent 2px 5px)}
.legend{display:flex;align-items:center;gap:6px;font-size:12px}
.bar{width:220px;height:12px;border:1px solid #aaa;
 background:linear-gradient(90deg,rgba(178,24,43,.85),rgba(255,255,255,0) 50%,rgba(33,102,172,.85))}
table{border-collapse:collapse}
td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
table.sum{font-size:12px;margin-right:16px}
table.sum td:not(.ctx){white-space:nowrap}
tr.jump{cursor:pointer}tr.jump:hover{background:#eef}
.after{color:#888}
.pair{display:flex;flex-wrap:wrap;align-items:flex-start;gap:8px}
section#summaries{padding:8px 16px;border-top:2px solid #ddd}
section h2{font-size:15px;margin:18px 0 6px}
#nbs td.nb-ctx{font-family:Georgia,serif;color:#444}
#nbs td.nb-next{font-weight:bold;white-space:nowrap}
tr.nb.hit td.nb-next{color:#1a7f37}
tr.nb.hit td.nb-next::after{content:" \\2713"}
.kv td:first-child{color:#555}
"""

_JS = r"""
(function () {
  const t0 = performance.now();
  const D = JSON.parse(document.getElementById('data').textContent);
  function decode(a) {
    const bin = atob(a.b64), buf = new ArrayBuffer(bin.length), u8 = new Uint8Array(buf);
    for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    const T = {int32: Int32Array, int16: Int16Array, uint16: Uint16Array, float32: Float32Array,
               float64: Float64Array, uint8: Uint8Array}[a.dtype];
    return new T(buf);
  }
  const A = {};
  for (const k in D.arrays) A[k] = decode(D.arrays[k]);
  const M = D.meta, N = M.tokens, P = M.page_tokens, S = M.neighbors_shown, V = D.vocab;
  const NL = new Set(D.newline), SCALE = M.scale;
  const pages = Math.max(1, Math.ceil(N / P));
  let page = 0, selected = -1;
  const text = document.getElementById('text'), panel = document.getElementById('panel');
  const piece = id => NL.has(id) ? '\u21b5' : V[id];
  const joinIds = ids => ids.map(piece).join(D.joiner);
  function color(g) {
    if (!isFinite(g)) g = g > 0 ? SCALE : -SCALE;
    const a = Math.min(1, Math.abs(g) / SCALE) * 0.85;
    return g >= 0 ? `rgba(33,102,172,${a.toFixed(3)})` : `rgba(178,24,43,${a.toFixed(3)})`;
  }
  function gain(i) { return A.lp_final[i] - A.lp_lm[i]; }
  function render(p) {
    page = Math.max(0, Math.min(pages - 1, p));
    const frag = document.createDocumentFragment();
    const lo = page * P, hi = Math.min(N, lo + P);
    for (let i = lo; i < hi; i++) {
      const id = A.tok[i], s = document.createElement('span');
      s.className = 'tok' + (A.searched[i] ? '' : ' nosearch') + (i === selected ? ' sel' : '');
      s.dataset.i = i;
      s.textContent = piece(id);
      s.style.backgroundColor = color(gain(i));
      frag.appendChild(s);
      if (NL.has(id)) frag.appendChild(document.createTextNode('\n'));
      else if (D.joiner) frag.appendChild(document.createTextNode(D.joiner));
    }
    text.replaceChildren(frag);
    document.getElementById('pageinfo').textContent =
      `page ${page + 1} of ${pages} (tokens ${lo.toLocaleString()}\u2013${(hi - 1).toLocaleString()})`;
    document.getElementById('prev').disabled = page === 0;
    document.getElementById('next').disabled = page === pages - 1;
  }
  const pr = x => Math.exp(x) >= 1e-3 ? Math.exp(x).toFixed(4) : Math.exp(x).toExponential(2);
  function rankLM(r) { return r > 0 ? String(r) : r < 0 ? 'beyond the top ' + ((M.lm_top_k) || 'k') : 'n/a (no LM features in the export)'; }
  function rankKNN(r) { return r > 0 ? String(r) + ' (among the ' + M.k_kept + ' kept neighbors)' : 'not among the ' + M.k_kept + ' kept neighbors'; }
  function el(tag, attrs, txt) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (txt !== undefined) e.textContent = txt;
    return e;
  }
  function show(i) {
    if (i < 0 || i >= N) return;
    selected = i;
    if (Math.floor(i / P) !== page) render(Math.floor(i / P)); else {
      text.querySelectorAll('.tok.sel').forEach(e => e.classList.remove('sel'));
    }
    const span = text.querySelector(`.tok[data-i="${i}"]`);
    if (span) { span.classList.add('sel'); span.scrollIntoView({block: 'nearest'}); }
    const t = A.tok[i];
    panel.classList.remove('empty');
    panel.replaceChildren();
    panel.appendChild(el('h3', {id: 'ptitle'}, `token ${i.toLocaleString()}: \u201c${piece(t)}\u201d`));
    panel.firstChild.dataset.i = i;
    const lo = Math.max(0, i - 30), ctx = el('p', {class: 'pctx'});
    ctx.appendChild(document.createTextNode(joinIds(Array.from(A.tok.slice(lo, i))) + D.joiner));
    ctx.appendChild(el('b', {}, piece(t)));
    panel.appendChild(ctx);
    const kv = el('table', {class: 'kv', id: 'kv'});
    const g = gain(i);
    const unsearched = A.searched[i] ? '' : (M.unsearched === 'lm_only' ? 'not searched: p_LM alone' : 'not searched: RetoMaton pointers');
    const rows = [['p_LM', pr(A.lp_lm[i])], ['p_kNN', A.searched[i] || M.unsearched !== 'lm_only' ? pr(A.lp_knn[i]) : 'none'],
      ...(unsearched ? [['search', unsearched]] : []),
      ['p_kNN-LM', pr(A.lp_final[i])], ['\u03bb', String(M.lmbda)],
      ['gain (nats)', (g >= 0 ? '+' : '') + g.toFixed(3)], ['rank under p_LM', rankLM(A.rank_lm[i])],
      ['rank under p_kNN', rankKNN(A.rank_knn[i])], ['target count in the datastore', A.freq[i].toLocaleString()],
      ['longest context n-gram in the datastore', A.match[i] >= M.max_ngram ? M.max_ngram + '+' : String(A.match[i])]];
    for (const [k, v] of rows) { const tr = el('tr', {'data-k': k}); tr.appendChild(el('td', {}, k)); tr.appendChild(el('td', {}, v)); kv.appendChild(tr); }
    panel.appendChild(kv);
    panel.appendChild(el('h4', {}, `nearest ${S} neighbors: distance, datastore row, next token (\u2713 = the target), the text before it`));
    const nb = el('table', {id: 'nbs'});
    const head = el('tr'); for (const h of ['#', 'distance', 'row', 'next', 'preceding datastore text']) head.appendChild(el('th', {}, h));
    nb.appendChild(head);
    for (let j = 0; j < S; j++) {
      const q = A.nb_q[i * S + j];
      if (q < 0) continue;
      const v = A.snip[q], c = A.nb_clen[i * S + j], ids = Array.from(A.snip.slice(q - c, q));
      const tr = el('tr', {class: 'nb' + (v === t ? ' hit' : ''), 'data-id': String(A.nb_id[i * S + j]),
        'data-value': String(v), 'data-ctx': ids.join(' ')});
      tr.appendChild(el('td', {}, String(j + 1)));
      tr.appendChild(el('td', {class: 'nb-dist'}, A.nb_dist[i * S + j].toPrecision(5)));
      tr.appendChild(el('td', {class: 'nb-row'}, String(A.nb_id[i * S + j])));
      tr.appendChild(el('td', {class: 'nb-next'}, piece(v)));
      tr.appendChild(el('td', {class: 'nb-ctx'}, joinIds(ids)));
      nb.appendChild(tr);
    }
    panel.appendChild(nb);
  }
  text.addEventListener('click', e => { const s = e.target.closest('.tok'); if (s) show(+s.dataset.i); });
  document.getElementById('prev').onclick = () => render(page - 1);
  document.getElementById('next').onclick = () => render(page + 1);
  document.getElementById('goto').onchange = e => { const i = parseInt(e.target.value, 10); if (i >= 0 && i < N) show(i); };
  document.querySelectorAll('tr.jump').forEach(tr => tr.addEventListener('click', () => {
    show(+tr.dataset.i); document.getElementById('textcol').scrollIntoView();
  }));
  render(0);
  window.explorer = {count: N, pages: pages, pageTokens: P, show: show, render: render,
                     readyMs: performance.now() - t0};
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>%TITLE%</title><style>%CSS%</style></head>
<body>
<header><h1>%TITLE%</h1><div class="notes">%NOTES%</div></header>
<div id="layout">
<div id="textcol">
<div id="nav"><button id="prev">&larr; previous</button><span id="pageinfo"></span><button id="next">next &rarr;</button>
<label>go to token <input id="goto" type="number" min="0" style="width:7em"></label>
<span class="legend">loss <span class="bar"></span> gain (&plusmn;%SCALE% nats and beyond)</span></div>
<div id="text"></div>
</div>
<aside id="panel" class="empty">Select a token to see p_LM, p_kNN, p_kNN-LM, the target's ranks and its nearest neighbors.</aside>
</div>
%SUMMARIES%
<script id="data" type="application/json">%DATA%</script>
<script>%JS%</script>
</body></html>
"""
