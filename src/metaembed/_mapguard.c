/*
 * SIGBUS guard for the index's memory-mapped segment files.
 *
 * Why it exists: reading a page of a file mapping beyond the file's current end raises SIGBUS, which ends the
 * process. Segment files are immutable, but something outside metaembed can still truncate one while it is
 * mapped (an operator, a sync tool, a damaged disk). The index checks file sizes before each search, yet a
 * truncation can land during one; this guard makes that survivable.
 *
 * How: a SIGBUS handler looks the faulting address up in a table of registered ranges (the index's mappings).
 * If it is in one, it maps a private zero page over the faulting page (MAP_FIXED) and counts a fault for that
 * range, then returns: the interrupted instruction re-runs and reads zeros. The index checks the counts of its
 * ranges after every read and reports the file as damaged instead of returning results computed from zeros.
 * A SIGBUS outside every range goes to the handler that was installed before (or the default action).
 *
 * The handler runs on the faulting thread, whichever it is (a torch or kernel worker thread too), takes no
 * locks and allocates nothing: the table is a fixed array of slots published with atomic stores.
 *
 * Built by setup.py as an optional extension module; it exports plain C functions that
 * metaembed.index.mapguard loads with ctypes. No CPython API is used beyond the empty module the import
 * machinery needs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 8192

struct slot {
    uintptr_t start; /* 0 = free */
    uintptr_t end;
    long faults;
};

static struct slot slots[SLOTS];
static struct sigaction previous;
static int installed;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t addr = (uintptr_t)info->si_addr;
    if (info->si_code > 0) { /* raised by a fault, not sent by kill(2) / raise(3) */
        for (int i = 0; i < SLOTS; i++) {
            uintptr_t start = __atomic_load_n(&slots[i].start, __ATOMIC_ACQUIRE);
            if (start == 0 || addr < start || addr >= __atomic_load_n(&slots[i].end, __ATOMIC_ACQUIRE))
                continue;
            uintptr_t page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
            void *page = (void *)(addr & ~(page_size - 1));
            if (mmap(page, page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
                MAP_FAILED)
                break;
            __atomic_add_fetch(&slots[i].faults, 1, __ATOMIC_RELEASE);
            return;
        }
    }
    /* Not ours: hand it to the previous disposition. */
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* Default action: restore it and let the fault (or the signal) happen again, which ends the process. */
    signal(sig, SIG_DFL);
    if (info->si_code <= 0) raise(sig);
}

/* Install the handler once per process; returns 0 on success. */
int metaembed_mapguard_install(void) {
    if (__atomic_load_n(&installed, __ATOMIC_ACQUIRE)) return 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) return -1;
    __atomic_store_n(&installed, 1, __ATOMIC_RELEASE);
    return 0;
}

/* Register [start, start + length); returns the slot, or -1 when the table is full. */
int metaembed_mapguard_add(uintptr_t start, uintptr_t length) {
    if (start == 0 || length == 0) return -1;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t expected = 0;
        /* claim the slot with a placeholder so the handler never sees a start without its end */
        if (__atomic_load_n(&slots[i].start, __ATOMIC_RELAXED) != 0) continue;
        if (!__atomic_compare_exchange_n(&slots[i].start, &expected, UINTPTR_MAX, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        __atomic_store_n(&slots[i].faults, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&slots[i].end, start + length, __ATOMIC_RELEASE);
        __atomic_store_n(&slots[i].start, start, __ATOMIC_RELEASE);
        return i;
    }
    return -1;
}

/* Faults counted in a slot since it was registered. */
long metaembed_mapguard_faults(int slot) {
    if (slot < 0 || slot >= SLOTS) return 0;
    return __atomic_load_n(&slots[slot].faults, __ATOMIC_ACQUIRE);
}

/* Free a slot (call before the mapping is unmapped). */
void metaembed_mapguard_remove(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    __atomic_store_n(&slots[slot].start, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&slots[slot].end, 0, __ATOMIC_RELEASE);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_mapguard",
    .m_doc = "SIGBUS guard for memory-mapped index files, called through ctypes (see metaembed.index.mapguard).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__mapguard(void) { return PyModule_Create(&module); }
