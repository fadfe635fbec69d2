"""Protein tasks: Gene Ontology term prediction (CAFA scoring) and antimicrobial peptides."""
