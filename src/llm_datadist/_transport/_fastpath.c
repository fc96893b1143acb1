/* The compiled data path: a whole process_vm_readv/writev plan with the GIL released once.
 *
 * pvm_rw(mode, pid, local, remote, sizes, guard_addrs, guard_values, threads, split_bytes, deadline)
 *   (mode 0 read, 1 write; 2 = memmove inside this process, for ranges the caller guarantees mapped) moves sizes[i] bytes between local[i] (this process) and remote[i] (process pid), in calls of at most
 *   IOV_MAX iovecs and CHUNK_BYTES bytes, across up to ``threads`` threads (byte-balanced parts of at least
 *   ``split_bytes`` each), without taking the GIL between calls. With guards (reads only) every call reads each
 *   guard word first and last into a buffer of its own and both copies must equal the expected value: the
 *   data of that call was copied while the owner still held the memory. ``deadline`` (CLOCK_MONOTONIC seconds,
 *   the clock of Python's time.monotonic; 0 = none) is checked before every call.
 *
 * Returns (status, errno, moved, got, expected): status 0 ok, 1 a failed system call (errno), 2 a short copy
 * (got of expected bytes: memory not mapped on one side), 3 a guard word changed, 4 the deadline passed.
 * The Python side (pvm.py) turns a status into its exception; the arguments are checked here (types,
 * lengths) and the addresses by the engine before a plan exists, as for the pure-Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#define CALL_IOVS 1024            /* UIO_MAXIOV */
#define CHUNK_BYTES (1ULL << 30)  /* the kernel truncates one call at MAX_RW_COUNT (~2 GiB) */
#define MAX_GUARDS 256
#define MAX_THREADS 16

enum { ST_OK = 0, ST_ERRNO = 1, ST_SHORT = 2, ST_STALE = 3, ST_TIMEOUT = 4 };
enum { MODE_READ = 0, MODE_WRITE = 1, MODE_MEMCPY = 2 };

typedef struct {
    const uint64_t *local, *remote, *sizes;
    Py_ssize_t start, stop; /* ops [start, stop) */
    const uint64_t *gaddr, *gval;
    Py_ssize_t nguards;
    int write;
    pid_t pid;
    double deadline;
    int status, err;
    unsigned long long moved, got, expected;
} part_t;

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void run_part(part_t *p) {
    struct iovec liov[CALL_IOVS], riov[CALL_IOVS];
    uint64_t scratch[2 * MAX_GUARDS];
    const Py_ssize_t g = p->nguards;
    const Py_ssize_t per_call = CALL_IOVS - 2 * g;
    Py_ssize_t op = p->start;
    uint64_t off = 0;
    int first = 1;

    for (;;) {
        int cnt = 0;
        uint64_t data = 0;
        if (op >= p->stop && !(first && g)) /* done (a plan of no ops with guards still reads them once) */
            break;
        first = 0;
        if (p->deadline > 0 && monotonic_now() > p->deadline) {
            p->status = ST_TIMEOUT;
            return;
        }
        for (Py_ssize_t k = 0; k < g; k++, cnt++) {
            liov[cnt].iov_base = &scratch[k];
            liov[cnt].iov_len = 8;
            riov[cnt].iov_base = (void *)(uintptr_t)p->gaddr[k];
            riov[cnt].iov_len = 8;
        }
        while (op < p->stop && cnt < g + per_call && data < CHUNK_BYTES) {
            uint64_t left = p->sizes[op] - off, take = CHUNK_BYTES - data;
            if (left == 0) {
                op++;
                off = 0;
                continue;
            }
            if (take > left)
                take = left;
            liov[cnt].iov_base = (void *)(uintptr_t)(p->local[op] + off);
            liov[cnt].iov_len = (size_t)take;
            riov[cnt].iov_base = (void *)(uintptr_t)(p->remote[op] + off);
            riov[cnt].iov_len = (size_t)take;
            cnt++;
            data += take;
            off += take;
            if (off == p->sizes[op]) {
                op++;
                off = 0;
            }
        }
        for (Py_ssize_t k = 0; k < g; k++, cnt++) {
            liov[cnt].iov_base = &scratch[g + k];
            liov[cnt].iov_len = 8;
            riov[cnt].iov_base = (void *)(uintptr_t)p->gaddr[k];
            riov[cnt].iov_len = 8;
        }
        if (cnt == 0)
            break;
        uint64_t expected = data + 16 * (uint64_t)g;
        ssize_t got;
        do {
            got = p->write == MODE_WRITE ? process_vm_writev(p->pid, liov, cnt, riov, cnt, 0)
                           : process_vm_readv(p->pid, liov, cnt, riov, cnt, 0);
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            p->status = ST_ERRNO;
            p->err = errno;
            return;
        }
        if ((uint64_t)got != expected) {
            p->status = ST_SHORT;
            p->got = (unsigned long long)got;
            p->expected = expected;
            return;
        }
        for (Py_ssize_t k = 0; k < 2 * g; k++) {
            if (scratch[k] != p->gval[k % g]) {
                p->status = ST_STALE;
                return;
            }
        }
        p->moved += data;
    }
    p->status = ST_OK;
}

/* mode MEMCPY: copies inside this process (the caller guarantees every range is mapped, as for memmove) */
static void run_memcpy_part(part_t *p) {
    for (Py_ssize_t op = p->start; op < p->stop; op++) {
        if ((op - p->start) % CALL_IOVS == 0 && p->deadline > 0 && monotonic_now() > p->deadline) {
            p->status = ST_TIMEOUT;
            return;
        }
        memmove((void *)(uintptr_t)p->local[op], (const void *)(uintptr_t)p->remote[op], (size_t)p->sizes[op]);
        p->moved += p->sizes[op];
    }
    p->status = ST_OK;
}

static void *part_thread(void *arg) {
    part_t *p = (part_t *)arg;
    if (p->write == MODE_MEMCPY)
        run_memcpy_part(p);
    else
        run_part(p);
    return NULL;
}

/* A contiguous buffer of n uint64 (anything with the buffer protocol of 8-byte items: numpy uint64, array('Q')). */
static int get_u64(PyObject *obj, Py_buffer *view, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strchr("QLqlN", view->format[strlen(view->format) - 1]) == NULL
        || view->ndim > 1) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-D buffer of 64-bit unsigned integers", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *pvm_rw(PyObject *self, PyObject *args) {
    int write, threads;
    long pid;
    unsigned long long split_bytes;
    double deadline;
    PyObject *o_local, *o_remote, *o_sizes, *o_gaddr, *o_gval;
    Py_buffer b[5];
    int held = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "ilOOOOOiKd", &write, &pid, &o_local, &o_remote, &o_sizes, &o_gaddr, &o_gval,
                          &threads, &split_bytes, &deadline))
        return NULL;
    PyObject *objs[5] = {o_local, o_remote, o_sizes, o_gaddr, o_gval};
    const char *names[5] = {"local", "remote", "sizes", "guard_addrs", "guard_values"};
    for (; held < 5; held++)
        if (get_u64(objs[held], &b[held], names[held]) < 0)
            goto done;
    Py_ssize_t n = b[0].len / 8, g = b[3].len / 8;
    if (b[1].len / 8 != n || b[2].len / 8 != n || b[4].len / 8 != g) {
        PyErr_SetString(PyExc_ValueError, "local, remote and sizes (and the two guard buffers) differ in length");
        goto done;
    }
    if (write < MODE_READ || write > MODE_MEMCPY) {
        PyErr_SetString(PyExc_ValueError, "mode must be 0 (read), 1 (write) or 2 (memcpy in this process)");
        goto done;
    }
    if (g > MAX_GUARDS || (write != MODE_READ && g)) {
        PyErr_SetString(PyExc_ValueError, "too many guard words (or guards on a write or a memcpy)");
        goto done;
    }
    if (pid <= 0) {
        PyErr_SetString(PyExc_ValueError, "pid must be positive");
        goto done;
    }
    const uint64_t *sizes = (const uint64_t *)b[2].buf;
    unsigned long long total = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        total += sizes[i];
    int parts = 1;
    if (threads > 1 && split_bytes > 0 && total >= 2 * split_bytes) {
        unsigned long long by_bytes = total / split_bytes;
        parts = threads < MAX_THREADS ? threads : MAX_THREADS;
        if ((unsigned long long)parts > by_bytes)
            parts = (int)by_bytes;
        if (parts > n)
            parts = (int)n;
        if (parts < 1)
            parts = 1;
    }
    part_t p[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    memset(p, 0, sizeof(p));
    memset(started, 0, sizeof(started));
    /* byte-balanced cuts at op boundaries */
    Py_ssize_t edge = 0;
    unsigned long long acc = 0;
    for (int k = 0; k < parts; k++) {
        p[k].local = (const uint64_t *)b[0].buf;
        p[k].remote = (const uint64_t *)b[1].buf;
        p[k].sizes = sizes;
        p[k].gaddr = (const uint64_t *)b[3].buf;
        p[k].gval = (const uint64_t *)b[4].buf;
        p[k].nguards = g;
        p[k].write = write;
        p[k].pid = (pid_t)pid;
        p[k].deadline = deadline;
        p[k].start = edge;
        if (k == parts - 1) {
            edge = n;
        } else {
            unsigned long long goal = total / (unsigned long long)parts * (unsigned long long)(k + 1);
            while (edge < n && acc < goal)
                acc += sizes[edge++];
            if (edge == p[k].start && edge < n) /* at least one op per part */
                acc += sizes[edge++];
        }
        p[k].stop = edge;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int k = 1; k < parts; k++)
        started[k] = pthread_create(&tid[k], NULL, part_thread, &p[k]) == 0;
    part_thread(&p[0]);
    for (int k = 1; k < parts; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            part_thread(&p[k]); /* no thread to be had: run it here */
    }
    Py_END_ALLOW_THREADS
    unsigned long long moved = 0;
    for (int k = 0; k < parts; k++)
        moved += p[k].moved;
    for (int k = 0; k < parts; k++) {
        if (p[k].status != ST_OK) {
            result = Py_BuildValue("iiKKK", p[k].status, p[k].err, moved, p[k].got, p[k].expected);
            goto done;
        }
    }
    result = Py_BuildValue("iiKKK", ST_OK, 0, moved, 0ULL, 0ULL);
done:
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&b[k]);
    return result;
}

static PyMethodDef methods[] = {
    {"pvm_rw", pvm_rw, METH_VARARGS,
     "pvm_rw(mode, pid, local, remote, sizes, guard_addrs, guard_values, threads, split_bytes, deadline) -> "
     "(status, errno, moved, got, expected): a whole process_vm_readv/writev plan (mode 0/1), or memmoves in this "
     "process (mode 2), with the GIL released once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The compiled data path of llm_datadist's same-host transports.", -1, methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
