"""One request's life through the gateway, one object per concern.

    context.py   RequestContext: what is known about the request, and its State
    admitter.py  price, route, access, reserve: Admitted or a GatewayError (shielded from cancels)
    meters.py    JsonMeter and SseMeter: what the response cost (the live cap inside SseMeter)
    settler.py   ends the reservation exactly once: settle with the real cost, settle with a
                 documented estimate, or release; writes the attribution record
    record.py    the attribution record
    protect.py   run_protected: Redis work a cancelled stream cannot stop halfway

The state machine (State in context.py), every transition out of RESERVED ending in exactly one
of SETTLED or RELEASED, whatever happens to the gRPC stream:

    NEW ──► ADMITTING ──► RESERVED ──► FORWARDED ──► SETTLED
     │          │             │                         ▲
     └──────────┴──► REFUSED  ├──────► RELEASED         │ (also when the stream ends early:
                              │                         │  `interrupted`, from Settler.close)
                              └──────► CACHED  (a response-cache hit: lease settled at $0, extproc/cache/)
"""
