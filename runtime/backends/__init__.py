"""Inference backends behind one interface; heavy libraries are imported lazily."""
