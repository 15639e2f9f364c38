"""The admin API (protos/tollgate/admin/v1/admin.proto): usage, budget status, dry runs.

`extproc.admin.build` compiles the proto at install time (and lazily on first import of
`extproc.admin.service`, so a fresh clone works); `extproc.admin.service` is the gRPC servicer
the ext_proc process serves on its admin port.
"""
