"""Results and reports: gathering result parts, bootstrap verdicts, the HTML report."""
