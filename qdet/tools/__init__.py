"""Looking inside a model: ``qdet explain`` (attention and sampling), ``qdet match-debug``
(the Hungarian assignment), drawing, and the benchmarks."""
