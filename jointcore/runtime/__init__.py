"""What running a model needs besides its maths: estimating its memory before allocating anything
(:mod:`.memory`) and honouring Cancel inside long forward passes (:mod:`.interrupt`)."""
