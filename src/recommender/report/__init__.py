"""`recommender report`: one self-contained HTML report of a run, with its figures as PNGs.

    recommender report --run runs/NAME [--mf runs/MF | --no-mf] [--mf-set KEY=VALUE]
        [--out DIR] [--k 10] [--users 6]

The report (RUN/report/report.html, figures beside it, numbers in insights.json) holds: a
summary, the training curves from metrics.jsonl, test metrics of the model, MF and Popularity
under both protocols (from `evaluate_run`), NeuMF's GMF / MLP branch share, the item map,
popularity bias and coverage, metrics by user activity and sample recommendations with titles
and explanations (fold-in integrated gradients over the user's history, see explain/).

The package, by concept: `build` (build_report: load, compute, lay out, write), `sections`
(one function per section), `figures` (matplotlib -> PNG bytes), `page` (escaping and the HTML
page) and `baseline` (the MF run the report compares against, trained here when not given).
"""

from recommender.report.baseline import ensure_mf_baseline, mf_baseline_config
from recommender.report.build import build_report
from recommender.report.page import SECTIONS

__all__ = ["SECTIONS", "build_report", "ensure_mf_baseline", "mf_baseline_config"]
