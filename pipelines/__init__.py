"""Command-line stages. Each wires pieces from the other packages; none holds math of its own."""
