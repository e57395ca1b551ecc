"""Text quality: heuristic rules, language ID, fastText classifiers, n-gram LMs."""
