"""Small, reproducible text corpora for kNN-LM experiments (see ``austen``)."""
