"""GDB remote serial protocol stub: `vmm run --gdb PORT|unix:PATH`.

    packets.py   framing: $payload#cs, escapes, run-length, acks, Ctrl-C (pure)
    commands.py  a payload decoded into a typed command (pure)
    regs.py      target description XML and the register file codec (pure)
    memory.py    virtual memory through the guest's own page tables (pure, mm walker)
    session.py   one client's commands answered against a debug target
    server.py    the listening socket and the connection thread
    debugger.py  the glue to a running Vm: hold/resume, breakpoints, stops
    monitor.py   `monitor ...` (qRcmd): the inspector's views as text
"""
