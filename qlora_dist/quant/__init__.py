"""Weight formats bitsandbytes' own loading does not cover, and how much of a model is really held in 4-bit."""
