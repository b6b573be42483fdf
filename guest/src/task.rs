//! Kernel tasks with cooperative switching.
//!
//! Each task runs on its own 64 KiB kernel stack (memory::stack: random
//! placement, unmapped guard page below and above). Task 0 is the boot flow
//! (`kernel_main`). `yield_now` switches round-robin to the next ready task
//! with a small assembly routine that saves the callee-saved registers and
//! RSP (no SSE/FPU state: the kernel has none). A task whose entry function
//! returns becomes Dead; its stack is freed by the next task that spawns,
//! yields or joins (never by itself, it is still running on it).
//!
//! Task slot `i` is stack record `i` of the inspect block, kept current on
//! every spawn, exit and switch.

use crate::inspect::{self, StackRecord, MAX_STACKS, STACK_IN_USE};
use crate::memory::paging::MapError;
use crate::memory::stack;
use core::arch::global_asm;
use core::cell::UnsafeCell;

pub const MAX_TASKS: usize = MAX_STACKS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Free,
    Ready,
    Running,
    Dead,
}

#[derive(Clone, Copy)]
struct Task {
    id: u32,
    state: State,
    rsp: u64,
    name: &'static str,
    stack: StackRecord,
}

impl Task {
    const FREE: Task = Task { id: 0, state: State::Free, rsp: 0, name: "", stack: StackRecord::EMPTY };
}

struct Table {
    tasks: [Task; MAX_TASKS],
    current: usize,
    next_id: u32,
}

struct Global(UnsafeCell<Table>);
// SAFETY: one CPU, interrupts off, cooperative: no concurrent access; the
// fault handler only reads the inspect block.
unsafe impl Sync for Global {}

static TABLE: Global = Global(UnsafeCell::new(Table { tasks: [Task::FREE; MAX_TASKS], current: 0, next_id: 1 }));

fn table() -> &'static mut Table {
    // SAFETY: see `Global`. Callers never hold the reference across a
    // switch (`task_switch` only gets raw pointers).
    unsafe { &mut *TABLE.0.get() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskError {
    TooManyTasks,
    Stack(MapError),
}

global_asm!(
    r#"
    .section .text.task, "ax"
    .global task_switch
task_switch:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov [rdi], rsp
    mov rsp, rsi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret

    .global task_trampoline
task_trampoline:
    mov rdi, r12
    call rbx
    call task_exit_current
    ud2
    .text
"#
);

extern "sysv64" {
    /// Saves callee-saved registers and RSP to `*save_rsp`, continues on
    /// `new_rsp` (a stack saved by `task_switch` or built by `spawn`).
    fn task_switch(save_rsp: *mut u64, new_rsp: u64);
    static task_trampoline: u8;
}

fn publish(i: usize, t: &Task) {
    let rec = if matches!(t.state, State::Free) { StackRecord::EMPTY } else { t.stack };
    inspect::update(|b| {
        b.stacks[i] = rec;
        b.stack_count = b.stacks.iter().filter(|r| r.flags & STACK_IN_USE != 0).count() as u32;
    });
}

/// Registers the boot flow as task 0 on a fresh guarded stack; returns the
/// stack top to switch to.
pub fn init_boot_task() -> Result<u64, TaskError> {
    // Map and record in one inspect critical section: a host never sees the
    // stack's pages mapped without the record that owns them.
    inspect::critical(|| {
        let rec = stack::alloc_stack(0, &[]).map_err(TaskError::Stack)?;
        let t = table();
        t.tasks[0] = Task { id: 0, state: State::Running, rsp: 0, name: "kernel", stack: rec };
        t.current = 0;
        publish(0, &t.tasks[0]);
        inspect::update(|b| b.current_task = 0);
        Ok(rec.top)
    })
}

/// Frees the stacks of dead tasks other than the current one.
pub fn reap() {
    let t = table();
    for i in 0..MAX_TASKS {
        if t.tasks[i].state == State::Dead && i != t.current {
            // Unmap and drop the record in one inspect critical section.
            inspect::critical(|| {
                stack::free_stack(&t.tasks[i].stack);
                t.tasks[i] = Task::FREE;
                publish(i, &t.tasks[i]);
            });
        }
    }
}

/// Creates a ready task that will run `entry(arg)`; returns its id.
pub fn spawn(name: &'static str, entry: extern "sysv64" fn(u64), arg: u64) -> Result<u32, TaskError> {
    reap();
    let t = table();
    let i = t.tasks.iter().position(|x| x.state == State::Free).ok_or(TaskError::TooManyTasks)?;
    let in_use: [StackRecord; MAX_TASKS] = core::array::from_fn(|k| t.tasks[k].stack);
    let id = t.next_id;
    // The stack is mapped and its record published in one inspect critical
    // section (see `init_boot_task`).
    let section = inspect::begin();
    let rec = match stack::alloc_stack(id, &in_use) {
        Ok(rec) => rec,
        Err(e) => {
            inspect::end(section);
            return Err(TaskError::Stack(e));
        }
    };
    t.next_id += 1;
    // Initial frame popped by `task_switch`: r15 r14 r13 r12(arg) rbx(entry)
    // rbp(0), then `ret` into the trampoline with RSP 16-byte aligned.
    let frame = rec.top - 72;
    let words = [0, 0, 0, arg, entry as u64, 0, core::ptr::addr_of!(task_trampoline) as u64];
    // SAFETY: the stack was just mapped, writable and unused.
    unsafe { core::ptr::copy_nonoverlapping(words.as_ptr(), frame as *mut u64, words.len()) };
    t.tasks[i] = Task { id, state: State::Ready, rsp: frame, name, stack: rec };
    publish(i, &t.tasks[i]);
    inspect::end(section);
    Ok(id)
}

/// Switches to the next ready task (round robin); returns when this task is
/// scheduled again. No-op if no other task is ready.
pub fn yield_now() {
    reap();
    let t = table();
    let cur = t.current;
    let Some(next) = (1..=MAX_TASKS).map(|k| (cur + k) % MAX_TASKS).find(|&i| t.tasks[i].state == State::Ready) else {
        return;
    };
    if t.tasks[cur].state == State::Running {
        t.tasks[cur].state = State::Ready;
    }
    switch(cur, next);
}

fn switch(cur: usize, next: usize) {
    let t = table();
    t.tasks[next].state = State::Running;
    t.current = next;
    let id = t.tasks[next].id;
    inspect::update(|b| b.current_task = id);
    let save = core::ptr::addr_of_mut!(t.tasks[cur].rsp);
    let new = t.tasks[next].rsp;
    // SAFETY: `new` is a stack saved by `task_switch` or built by `spawn`;
    // `save` is the current task's slot, which stays valid.
    unsafe { task_switch(save, new) };
}

/// Called by the trampoline when a task's entry returns.
#[no_mangle]
extern "sysv64" fn task_exit_current() -> ! {
    let t = table();
    let cur = t.current;
    t.tasks[cur].state = State::Dead;
    let next = (1..=MAX_TASKS)
        .map(|k| (cur + k) % MAX_TASKS)
        .find(|&i| t.tasks[i].state == State::Ready)
        .expect("task exit with no ready task");
    switch(cur, next);
    unreachable!("dead task scheduled again");
}

/// Yields until task `id` has finished.
pub fn join(id: u32) {
    while state_of(id).is_some_and(|s| s != State::Dead) {
        yield_now();
    }
    reap();
}

/// State of task `id` (None once its slot is reaped or never existed).
pub fn state_of(id: u32) -> Option<State> {
    table().tasks.iter().find(|x| x.id == id && x.state != State::Free).map(|x| x.state)
}

pub fn current_id() -> u32 {
    let t = table();
    t.tasks[t.current].id
}

pub fn current_name() -> &'static str {
    let t = table();
    t.tasks[t.current].name
}

/// Stack record of task `id`.
pub fn stack_of(id: u32) -> Option<StackRecord> {
    table().tasks.iter().find(|x| x.id == id && x.state != State::Free).map(|x| x.stack)
}

/// Name of task `id` ("?" if unknown).
pub fn name_of(id: u32) -> &'static str {
    table().tasks.iter().find(|x| x.id == id && x.state != State::Free).map_or("?", |x| x.name)
}

/// Tasks not Free.
pub fn count() -> usize {
    table().tasks.iter().filter(|x| x.state != State::Free).count()
}
