"""Router: lead intake, routing into sequences, lead status."""
