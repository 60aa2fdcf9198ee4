"""Reports people can read in 30 seconds: JSON for machines, Markdown, and self-contained HTML with plots."""
