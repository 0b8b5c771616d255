"""charnn: a character-level GRU language model (Görner's RNN lesson), trained at cluster scale on Ray."""
