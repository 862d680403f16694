"""Results and reports: gathering result parts, what the report derives from them (analysis,
bootstrap verdicts), its plots, the HTML page and the terminal table.

    from persona_core.report import build_report, terminal_table
    print(terminal_table(table)); build_report(table, "report.html")
"""

from persona_core.report.analysis import (Analysis, analyse, pair_separation, pareto_points, steering_choices, summary,
                                          verdicts)
from persona_core.report.html import build_report
from persona_core.report.terminal import headline, terminal_table

__all__ = ["Analysis", "analyse", "build_report", "headline", "pair_separation", "pareto_points", "steering_choices",
           "summary", "terminal_table", "verdicts"]
