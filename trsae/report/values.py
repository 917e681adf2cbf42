"""Reading a results value, printing a number and naming a row: shared by the figures, tables and macros.

A results value may be an aggregated leaf ``{"mean", "se", "n", "values"}`` (`trsae.metrics.aggregate_seeds`) or
a plain number (se taken as 0); a missing or ``None`` value is drawn / printed as not available.

How a number is printed (`format_mean_se`): the standard error with one significant digit (two when its first digit
is 1) and the mean to the same decimal place, so ``0.91123 ± 0.000472`` reads ``0.9112 ± 0.0005``; scientific
notation only for tiny numbers (both below 10⁻³, and more than six decimals); a single seed's mean with three
significant digits and `SINGLE_SEED_MARK`, never ``± 0``; integer parts of five digits or more grouped in
thousands (``300,000``).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

Panel = tuple[str, str, str]
"""``(section, key, label)``: where a metric sits in a results dict, and what to call it."""

SINGLE_SEED_MARK = {False: "†", True: r"^{\dagger}"}
"""The mark of a single seed's number (no standard error), in text and in LaTeX math mode."""
SINGLE_SEED_NOTE = {False: "† single seed: no standard error",
                    True: r"$^{\dagger}$\,single seed: no standard error"}
"""The line a table adds under itself when one of its cells carries `SINGLE_SEED_MARK`."""


def metric_value(result: dict[str, Any], section: str, key: str) -> tuple[float, float] | None:
    """``(mean, se)`` of ``result[section][key]``, or None when missing / undefined / non-finite."""
    v = (result.get(section) or {}).get(key)
    if isinstance(v, dict):
        mean, se = v.get("mean"), v.get("se") or 0.0
    else:
        mean, se = v, 0.0
    if mean is None or isinstance(mean, bool):
        return None
    try:
        mean, se = float(mean), float(se)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(mean):
        return None
    return mean, (se if math.isfinite(se) else 0.0)


def metric_n(result: dict[str, Any], section: str, key: str) -> int | None:
    """The number of seeds behind ``result[section][key]`` (an aggregated leaf's ``n``); None for a plain number."""
    v = (result.get(section) or {}).get(key)
    n = v.get("n") if isinstance(v, dict) else None
    return int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else None


def budget_label(tokens: int) -> str:
    """A training budget as a column heading: ``"1.2M tokens"``, ``"75k tokens"``."""
    return f"{tokens / 1e6:g}M tokens" if tokens >= 1_000_000 else f"{tokens / 1e3:g}k tokens"


def by_budget(table: dict[int, dict]) -> dict[str, dict]:
    """A table keyed by training budget (tokens) with `budget_label` column headings, by increasing budget."""
    return {budget_label(t): table[t] for t in sorted(table)}


def group_thousands(text: str, latex: bool = False) -> str:
    """Thousands separators in the integer part of a fixed-notation number of five or more integer digits."""
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, dot, frac = body.partition(".")
    if len(whole) < 5 or not whole.isdigit():
        return text
    sep = "{,}" if latex else ","
    head = len(whole) % 3 or 3
    parts = [whole[:head]] + [whole[i:i + 3] for i in range(head, len(whole), 3)]
    return sign + sep.join(parts) + dot + frac


def _fixed(v: float, decimals: int, latex: bool) -> str:
    """``v`` rounded to ``decimals`` places (negative: to tens, hundreds, …), grouped, never ``-0``."""
    text = f"{round(v, decimals):.{max(decimals, 0)}f}"
    if re.fullmatch(r"-0(\.0*)?", text):
        text = text[1:]
    return group_thousands(text, latex)


def _sci(mant: str, exp: int, latex: bool) -> str:
    return f"{mant}\\times10^{{{exp}}}" if latex else f"{mant}e{exp}"


def format_number(v: float | int | None, digits: int = 3, latex: bool = False) -> str:
    """``digits`` significant digits in fixed notation; scientific below 1e-3; ints as they are. Integer parts of
    five or more digits are grouped in thousands (``300,000``; LaTeX ``300{,}000``).

    ``None`` / NaN give ``"n/a"``. With ``latex=True`` scientific values read ``1.20\\times10^{-4}``
    (wrap in math mode yourself; ``write_macros`` adds ``\\ensuremath``).
    """
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(v, numbers.Integral):
        return group_thousands(str(int(v)), latex)
    v = float(v)
    if not math.isfinite(v):
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3:
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        return _sci(mant, int(exp), latex)
    return _fixed(v, max(0, digits - 1 - math.floor(math.log10(a))), latex)


def se_decimals(se: float) -> int:
    """Decimal places that keep one significant digit of ``se`` (two when that digit is 1): ``0.000472 -> 4``,
    ``0.00100 -> 4``, ``0.0096 -> 3`` (it rounds to 0.010), ``23 -> -1``."""
    e = math.floor(math.log10(se))
    lead = round(se / 10 ** e)
    if lead >= 10:
        e, lead = e + 1, 1
    return 1 - e if lead == 1 else -e


def format_mean_se(mean: float | None, se: float | None = None, n: int | None = None, latex: bool = False,
                   mean_only: bool = False, digits: int = 3) -> str:
    """``mean ± se`` as a paper prints it: se to one significant digit (two if it starts with 1), the mean to the
    same place: ``(0.91123, 0.000472) -> "0.9112 ± 0.0005"``; ``(0.902, 0.001) -> "0.9020 ± 0.0010"``.

    ``n == 1`` (one seed): the mean with ``digits`` (3) significant digits and `SINGLE_SEED_MARK` (``"0.911†"``);
    an se of 0 (or below 1e-9 of the mean) or None, with more seeds (every seed equal) or none known (a plain
    number): the mean alone, unmarked.
    Scientific only when mean and se are both below 1e-3 and fixed notation would need more than six decimals:
    ``"(1.20 ± 0.03)e-5"``, but ``"-0.00009 ± 0.00003"``. ``latex=True`` gives math-mode
    text (``\\pm``, ``^{\\dagger}``, ``\\times10^{-5}``, ``12{,}340``) for the caller to wrap in ``$…$``.
    ``mean_only``: the mean exactly as it is printed here, without the ± part or the mark. None / NaN: ``"n/a"``.
    """
    if mean is None or not math.isfinite(float(mean)):
        return "n/a"
    mean = float(mean)
    se = float(se) if se is not None and math.isfinite(float(se)) else 0.0
    if se < 1e-9 * abs(mean):  # seeds equal up to float noise
        se = 0.0
    if n == 1 or se <= 0:
        text = format_number(mean, digits, latex)
        if mean_only or n != 1:
            return text
        return ("{" + text + "}" if latex and "^" in text else text) + SINGLE_SEED_MARK[latex]  # no double ^
    pm = r" \pm " if latex else " ± "
    big = max(abs(mean), se)
    if big < 1e-3 and se_decimals(se) > 6:  # tiny numbers: a common power of ten
        exp = math.floor(math.log10(big))
        inner = format_mean_se(mean / 10 ** exp, se / 10 ** exp, n, latex, mean_only)
        if mean_only:
            return _sci(inner, exp, latex)
        return f"({inner})\\times10^{{{exp}}}" if latex else f"({inner})e{exp}"
    d = se_decimals(se)
    m = _fixed(mean, d, latex)
    return m if mean_only else m + pm + _fixed(se, d, latex)


def is_single_seed(mean: float | None, n: int | None) -> bool:
    """Whether `format_mean_se` marks this value with `SINGLE_SEED_MARK`."""
    return n == 1 and mean is not None and math.isfinite(float(mean))


# ----------------------------------------------------------------------------------------------------------
# row names

PROBE_WORDS = {"upos": "part of speech", "xpos": "fine part of speech", "deprel": "dependency relation",
               "head_dir": "direction to the head", "head_dist": "distance to the head",
               "abs_pos": "token position in context", "word_pos": "word position in sentence",
               "connective": "connective", "clause_start": "clause start"}
"""Words for the UD labels that notebook 04 probes (`trsae.evals.ud.LABELS`, `trsae.evals.measures.PROBE_LABELS`)."""

ROW_WORDS = {
    "blimp": "BLiMP accuracy", "syntaxgym": "SyntaxGym accuracy", "linzen": "agreement accuracy (Linzen)",
    "blimp_macro": "BLiMP accuracy (mean over paradigms)",
    "blimp_kept": "BLiMP accuracy kept", "syntaxgym_kept": "SyntaxGym accuracy kept",
    "linzen_kept": "agreement accuracy kept (Linzen)",
    "gap_preference_acc": "GAP name preference accuracy", "gap_agreement": "GAP preference agreement with clean",
    "labelled_frac": "labelled features", "alive_frac": "alive features", "mean_density": "mean feature density",
    "stay": "features staying active at the next token", "stay_lift": "staying active over density (lift)",
}
"""Words for the raw keys of notebook 04's rows (syntax, discourse and autointerp sections), whatever label the
row carries; probe rows ``<label>_k<k>`` and ``gap_probe_k<k>`` are named by `row_label`."""

_PROBE_KEY = re.compile(r"^(?P<lab>[a-z_]+?)_(?:k(?P<k>\d+)|(?P<maj>majority))$")


def row_label(section: str, key: str, label: str) -> str:
    """The words a table or figure shows for a row: `ROW_WORDS` / `PROBE_WORDS` for notebook 04's raw keys
    (``"clause_start_k1" -> "clause start (k = 1 probe)"``), else the row's own ``label``."""
    if key in ROW_WORDS:
        return ROW_WORDS[key]
    if key.startswith("labelled_") and key[len("labelled_"):] in PROBE_WORDS:
        return f"features labelled by {PROBE_WORDS[key[len('labelled_'):]]}"
    m = _PROBE_KEY.match(key)
    if m:
        lab = m["lab"]
        what = ("GAP antecedent" if lab == "gap_probe" else PROBE_WORDS.get(lab))
        if what is not None:
            return f"{what} (k = {m['k']} probe)" if m["k"] else f"{what} (majority baseline)"
    return label
