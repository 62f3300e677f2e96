"""Pi0 / Pi0.5 (openpi) vision-language-action policy."""
