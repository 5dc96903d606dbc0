"""The report page and plots, and the pull-request report."""
