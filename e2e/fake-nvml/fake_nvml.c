/*
 * fake_nvml.c - test equipment: a fake NVIDIA Management Library (libnvidia-ml.so).
 *
 * The real WhaleFlux worker loads this through its ordinary NVML library-path option
 * (nvml-wrapper: Nvml::builder().lib_path(path).init()), so GPU telemetry and GPU faults can be
 * tested on machines without NVIDIA hardware. Product code never knows it is fake.
 *
 * The GPUs are described by a plain-text state file whose path is in the environment variable
 * WHALEFLUX_FAKE_NVML_STATE. The file is re-read on every call, so a test changes what the
 * worker sees (a hot GPU, ECC errors, a GPU that fell off the bus) by rewriting it while the
 * worker runs. Tests must replace it atomically (write a temporary file, rename it over).
 *
 * Format: one "key value" per line; the value is the rest of the line after one space.
 * Lines starting with '#' (after optional blanks) and blank lines are ignored, as are unknown
 * keys. Numeric values may be decimal or 0x-hex and may be followed by blanks and a '#' comment;
 * string values (name, uuid) are the rest of the line with trailing blanks trimmed.
 *
 *   gpu_count 2
 *   gpu.N.name NVIDIA H100 80GB HBM3
 *   gpu.N.uuid GPU-00000000-0000-0000-0000-00000000000N   (default: N as 12 hex digits)
 *   gpu.N.temperature_c 45
 *   gpu.N.slowdown_c 87                  NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
 *   gpu.N.shutdown_c 92                  NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
 *   gpu.N.power_mw 250000
 *   gpu.N.power_limit_mw 700000          enforced power limit
 *   gpu.N.memory_total 85899345920       bytes
 *   gpu.N.memory_used 1073741824         bytes
 *   gpu.N.util_gpu 30                    percent
 *   gpu.N.util_memory 10                 percent
 *   gpu.N.ecc_uncorrected_volatile 0
 *   gpu.N.ecc_uncorrected_aggregate 0
 *   gpu.N.ecc_corrected_volatile 0
 *   gpu.N.ecc_corrected_aggregate 0
 *   gpu.N.throttle_reasons 0             bitmask of nvmlClocksThrottleReason* values
 *   gpu.N.pcie_replays 0                 nvmlDeviceGetPcieReplayCounter
 *   gpu.N.retired_pages_pending 0        nvmlDeviceGetRetiredPagesPendingStatus
 *   gpu.N.remapped_rows_correctable 0    nvmlDeviceGetRemappedRows: corrRows
 *   gpu.N.remapped_rows_uncorrectable 0  nvmlDeviceGetRemappedRows: uncRows
 *   gpu.N.row_remap_pending 0            nvmlDeviceGetRemappedRows: isPending
 *   gpu.N.row_remap_failure 0            nvmlDeviceGetRemappedRows: failureOccurred
 *   gpu.N.nvlink_links 4                 links 0..n-1 exist (at most 18)
 *   gpu.N.nvlink.L.active 1
 *   gpu.N.nvlink.L.replay_errors 0       NVML_NVLINK_ERROR_DL_REPLAY
 *   gpu.N.nvlink.L.recovery_errors 0     NVML_NVLINK_ERROR_DL_RECOVERY
 *   gpu.N.nvlink.L.crc_flit_errors 0     NVML_NVLINK_ERROR_DL_CRC_FLIT
 *   gpu.N.nvlink.L.crc_data_errors 0     NVML_NVLINK_ERROR_DL_CRC_DATA
 *   gpu.N.lost 0                         1: every call on the device returns GPU_IS_LOST
 *   xid.S G C                            XID event S (from 1, in order): GPU G reports XID C;
 *                                        an event set delivers those written after it was
 *                                        created, once each (nvmlEventSetWait_v2)
 *
 * Missing keys take the defaults above (gpu_count defaults to 0). Booleans are 0/1 or
 * false/true.
 *
 * Failure behaviour:
 *   - variable unset, or the file cannot be opened: nvmlInit* returns DRIVER_NOT_LOADED (9);
 *   - file vanishes after a successful init: calls that need state return UNKNOWN (999);
 *   - malformed numeric value, value out of range, or file over 1 MiB: UNKNOWN (999);
 *   - handle whose index is no longer below gpu_count: GPU_IS_LOST (15).
 *
 * Build: gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o libnvidia-ml-fake.so fake_nvml.c -lpthread
 *
 * All state lives in static storage behind one mutex; no call allocates on the heap.
 */

#define _POSIX_C_SOURCE 200809L /* O_CLOEXEC, ssize_t under strict -std= modes */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STATE_ENV "WHALEFLUX_FAKE_NVML_STATE"

/* ---- NVML types and constants (values from nvml.h / nvml-wrapper-sys bindings) ---- */

typedef unsigned int nvmlReturn_t;

#define NVML_SUCCESS 0u
#define NVML_ERROR_UNINITIALIZED 1u
#define NVML_ERROR_INVALID_ARGUMENT 2u
#define NVML_ERROR_NOT_SUPPORTED 3u
#define NVML_ERROR_INSUFFICIENT_SIZE 7u
#define NVML_ERROR_DRIVER_NOT_LOADED 9u
#define NVML_ERROR_TIMEOUT 10u
#define NVML_ERROR_GPU_IS_LOST 15u
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25u
#define NVML_ERROR_UNKNOWN 999u

typedef struct nvmlDevice_st {
    unsigned int index;
} *nvmlDevice_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2) */
#define NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef unsigned int nvmlEnableState_t;        /* NVML_FEATURE_DISABLED 0, ENABLED 1 */
typedef unsigned int nvmlTemperatureSensors_t; /* NVML_TEMPERATURE_GPU 0 */
typedef unsigned int nvmlTemperatureThresholds_t; /* SHUTDOWN 0, SLOWDOWN 1, ... */
typedef unsigned int nvmlMemoryErrorType_t;    /* CORRECTED 0, UNCORRECTED 1 */
typedef unsigned int nvmlEccCounterType_t;     /* VOLATILE 0, AGGREGATE 1 */
typedef unsigned int nvmlNvLinkErrorCounter_t; /* DL_REPLAY 0 .. DL_ECC_DATA 4 */

#define MAX_GPUS 64
#define MAX_LINKS 18 /* NVML_NVLINK_MAX_LINKS */
#define STR_CAP 96   /* NVML_DEVICE_NAME_V2_BUFFER_SIZE / NVML_DEVICE_UUID_V2_BUFFER_SIZE */
#define FILE_CAP (1u << 20)

#define DRIVER_VERSION "999.99-fake"
#define NVML_VERSION "12.999.99-fake"

/* ---- state ---- */

struct fake_link {
    int active;
    unsigned long long replay_errors;
    unsigned long long recovery_errors;
    unsigned long long crc_flit_errors;
    unsigned long long crc_data_errors;
};

struct fake_gpu {
    char name[STR_CAP];
    char uuid[STR_CAP];
    unsigned int temperature_c;
    unsigned int slowdown_c;
    unsigned int shutdown_c;
    unsigned int power_mw;
    unsigned int power_limit_mw;
    unsigned long long memory_total;
    unsigned long long memory_used;
    unsigned int util_gpu;
    unsigned int util_memory;
    unsigned long long ecc_uncorrected_volatile;
    unsigned long long ecc_uncorrected_aggregate;
    unsigned long long ecc_corrected_volatile;
    unsigned long long ecc_corrected_aggregate;
    unsigned long long throttle_reasons;
    unsigned int pcie_replays;
    int retired_pages_pending;
    unsigned int remapped_rows_correctable;
    unsigned int remapped_rows_uncorrectable;
    int row_remap_pending;
    int row_remap_failure;
    unsigned int nvlink_links;
    struct fake_link links[MAX_LINKS];
    int lost;
};

/* One XID event: `xid.<seq> <gpu> <code>` (seq from 1, in the order a test wrote them). */
struct fake_xid {
    unsigned int seq;
    unsigned int gpu;
    unsigned long long code;
};

#define MAX_XIDS 256
#define MAX_EVENT_SETS 16
#define EVENT_TYPE_XID 0x8ull /* nvmlEventTypeXidCriticalError */

struct fake_state {
    unsigned int gpu_count;
    struct fake_gpu gpus[MAX_GPUS];
    unsigned int xid_count;
    struct fake_xid xids[MAX_XIDS];
};

/* An event set: the event types each GPU registered, and the last XID it delivered. */
struct nvmlEventSet_st {
    int used;
    unsigned long long registered[MAX_GPUS];
    unsigned int delivered;
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

static struct nvmlEventSet_st g_sets[MAX_EVENT_SETS];

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_init_count; /* nvmlInit reference count */
static struct fake_state g_state; /* last parse; only valid under g_lock right after load_state */
static char g_file[FILE_CAP + 1];
static struct nvmlDevice_st g_devices[MAX_GPUS]; /* handles are pointers into this array */

static void default_gpu(struct fake_gpu *g, unsigned int index)
{
    unsigned int l;

    memset(g, 0, sizeof(*g));
    snprintf(g->name, sizeof(g->name), "%s", "NVIDIA H100 80GB HBM3");
    snprintf(g->uuid, sizeof(g->uuid), "GPU-00000000-0000-0000-0000-%012x", index);
    g->temperature_c = 45;
    g->slowdown_c = 87;
    g->shutdown_c = 92;
    g->power_mw = 250000;
    g->power_limit_mw = 700000;
    g->memory_total = 85899345920ull;
    g->memory_used = 1073741824ull;
    g->util_gpu = 30;
    g->util_memory = 10;
    g->nvlink_links = 4;
    for (l = 0; l < MAX_LINKS; l++)
        g->links[l].active = 1;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

/* Parse an unsigned number; only blanks or a '#' comment may follow. 0 on success. */
static int parse_u64(const char *s, unsigned long long *out)
{
    char *end;
    unsigned long long v;

    while (is_blank(*s))
        s++;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno != 0 || end == s)
        return -1;
    while (is_blank(*end))
        end++;
    if (*end != '\0' && *end != '#')
        return -1;
    *out = v;
    return 0;
}

static int parse_u32(const char *s, unsigned int *out)
{
    unsigned long long v;

    if (parse_u64(s, &v) != 0 || v > UINT_MAX)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

static int parse_bool(const char *s, int *out)
{
    unsigned long long v;
    size_t n;

    while (is_blank(*s))
        s++;
    n = strlen(s);
    while (n > 0 && is_blank(s[n - 1]))
        n--;
    if (n == 4 && strncmp(s, "true", 4) == 0) {
        *out = 1;
        return 0;
    }
    if (n == 5 && strncmp(s, "false", 5) == 0) {
        *out = 0;
        return 0;
    }
    if (parse_u64(s, &v) != 0 || v > 1)
        return -1;
    *out = (int)v;
    return 0;
}

static void parse_string(const char *s, char *dst, size_t cap)
{
    size_t n = strlen(s);

    while (n > 0 && is_blank(s[n - 1]))
        n--;
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, s, n);
    dst[n] = '\0';
}

/* Parse "<decimal>." at *p, advancing past the dot. 0 on success. */
static int parse_index(const char **p, unsigned int *out)
{
    const char *s = *p;
    unsigned long v = 0;

    if (*s < '0' || *s > '9')
        return -1;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > 100000)
            return -1;
        s++;
    }
    if (*s != '.')
        return -1;
    *p = s + 1;
    *out = (unsigned int)v;
    return 0;
}

static int parse_link_key(struct fake_link *l, const char *field, const char *value)
{
    if (strcmp(field, "active") == 0)
        return parse_bool(value, &l->active);
    if (strcmp(field, "replay_errors") == 0)
        return parse_u64(value, &l->replay_errors);
    if (strcmp(field, "recovery_errors") == 0)
        return parse_u64(value, &l->recovery_errors);
    if (strcmp(field, "crc_flit_errors") == 0)
        return parse_u64(value, &l->crc_flit_errors);
    if (strcmp(field, "crc_data_errors") == 0)
        return parse_u64(value, &l->crc_data_errors);
    return 0; /* unknown key */
}

static int parse_gpu_key(struct fake_gpu *g, const char *field, const char *value)
{
    if (strncmp(field, "nvlink.", 7) == 0) {
        const char *p = field + 7;
        unsigned int link;

        if (parse_index(&p, &link) != 0 || link >= MAX_LINKS)
            return 0; /* not a key we know */
        return parse_link_key(&g->links[link], p, value);
    }
    if (strcmp(field, "name") == 0) {
        parse_string(value, g->name, sizeof(g->name));
        return 0;
    }
    if (strcmp(field, "uuid") == 0) {
        parse_string(value, g->uuid, sizeof(g->uuid));
        return 0;
    }
    if (strcmp(field, "temperature_c") == 0)
        return parse_u32(value, &g->temperature_c);
    if (strcmp(field, "slowdown_c") == 0)
        return parse_u32(value, &g->slowdown_c);
    if (strcmp(field, "shutdown_c") == 0)
        return parse_u32(value, &g->shutdown_c);
    if (strcmp(field, "power_mw") == 0)
        return parse_u32(value, &g->power_mw);
    if (strcmp(field, "power_limit_mw") == 0)
        return parse_u32(value, &g->power_limit_mw);
    if (strcmp(field, "memory_total") == 0)
        return parse_u64(value, &g->memory_total);
    if (strcmp(field, "memory_used") == 0)
        return parse_u64(value, &g->memory_used);
    if (strcmp(field, "util_gpu") == 0)
        return parse_u32(value, &g->util_gpu);
    if (strcmp(field, "util_memory") == 0)
        return parse_u32(value, &g->util_memory);
    if (strcmp(field, "ecc_uncorrected_volatile") == 0)
        return parse_u64(value, &g->ecc_uncorrected_volatile);
    if (strcmp(field, "ecc_uncorrected_aggregate") == 0)
        return parse_u64(value, &g->ecc_uncorrected_aggregate);
    if (strcmp(field, "ecc_corrected_volatile") == 0)
        return parse_u64(value, &g->ecc_corrected_volatile);
    if (strcmp(field, "ecc_corrected_aggregate") == 0)
        return parse_u64(value, &g->ecc_corrected_aggregate);
    if (strcmp(field, "throttle_reasons") == 0)
        return parse_u64(value, &g->throttle_reasons);
    if (strcmp(field, "pcie_replays") == 0)
        return parse_u32(value, &g->pcie_replays);
    if (strcmp(field, "retired_pages_pending") == 0)
        return parse_bool(value, &g->retired_pages_pending);
    if (strcmp(field, "remapped_rows_correctable") == 0)
        return parse_u32(value, &g->remapped_rows_correctable);
    if (strcmp(field, "remapped_rows_uncorrectable") == 0)
        return parse_u32(value, &g->remapped_rows_uncorrectable);
    if (strcmp(field, "row_remap_pending") == 0)
        return parse_bool(value, &g->row_remap_pending);
    if (strcmp(field, "row_remap_failure") == 0)
        return parse_bool(value, &g->row_remap_failure);
    if (strcmp(field, "nvlink_links") == 0) {
        unsigned int n;

        if (parse_u32(value, &n) != 0 || n > MAX_LINKS)
            return -1;
        g->nvlink_links = n;
        return 0;
    }
    if (strcmp(field, "lost") == 0)
        return parse_bool(value, &g->lost);
    return 0; /* unknown key */
}

/* One line, NUL-terminated, without its '\n'. 0 on success, -1 on a bad value. */
static int parse_line(char *line)
{
    char *value;
    const char *p;
    unsigned int gpu;

    while (is_blank(*line))
        line++;
    if (*line == '\0' || *line == '#')
        return 0;
    value = strchr(line, ' ');
    if (value == NULL)
        return 0; /* a key without a value: ignored like an unknown key */
    *value++ = '\0';

    if (strcmp(line, "gpu_count") == 0) {
        unsigned int n;

        if (parse_u32(value, &n) != 0)
            return -1;
        g_state.gpu_count = n > MAX_GPUS ? MAX_GPUS : n;
        return 0;
    }
    if (strncmp(line, "xid.", 4) == 0) {
        struct fake_xid x;
        char *gpu_end;

        if (parse_u32(line + 4, &x.seq) != 0 || g_state.xid_count >= MAX_XIDS)
            return 0;
        gpu_end = strchr(value, ' ');
        if (gpu_end == NULL)
            return -1;
        *gpu_end++ = '\0';
        if (parse_u32(value, &x.gpu) != 0 || parse_u64(gpu_end, &x.code) != 0)
            return -1;
        g_state.xids[g_state.xid_count++] = x;
        return 0;
    }
    if (strncmp(line, "gpu.", 4) != 0)
        return 0;
    p = line + 4;
    if (parse_index(&p, &gpu) != 0 || gpu >= MAX_GPUS)
        return 0;
    return parse_gpu_key(&g_state.gpus[gpu], p, value);
}

/*
 * Read and parse the state file into g_state. Caller holds g_lock.
 * Returns NVML_SUCCESS, NVML_ERROR_DRIVER_NOT_LOADED (no variable, no file) or
 * NVML_ERROR_UNKNOWN (unreadable, too large, malformed).
 */
static nvmlReturn_t load_state(void)
{
    const char *path = getenv(STATE_ENV);
    size_t len = 0;
    char *line;
    unsigned int i;
    int fd;

    if (path == NULL || *path == '\0')
        return NVML_ERROR_DRIVER_NOT_LOADED;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    for (;;) {
        ssize_t n = read(fd, g_file + len, FILE_CAP + 1 - len);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            close(fd);
            return NVML_ERROR_UNKNOWN;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len > FILE_CAP) {
            close(fd);
            return NVML_ERROR_UNKNOWN;
        }
    }
    close(fd);
    g_file[len] = '\0';

    g_state.gpu_count = 0;
    g_state.xid_count = 0;
    for (i = 0; i < MAX_GPUS; i++)
        default_gpu(&g_state.gpus[i], i);

    line = g_file;
    while (line < g_file + len) {
        char *nl = memchr(line, '\n', (size_t)(g_file + len - line));

        if (nl != NULL)
            *nl = '\0';
        if (parse_line(line) != 0)
            return NVML_ERROR_UNKNOWN;
        if (nl == NULL)
            break;
        line = nl + 1;
    }
    return NVML_SUCCESS;
}

/* Caller holds g_lock. Loads state for calls that need an initialised library. */
static nvmlReturn_t begin_call(void)
{
    nvmlReturn_t r;

    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    r = load_state();
    /* After a successful init a vanished file is an unexpected failure, not "no driver". */
    return r == NVML_ERROR_DRIVER_NOT_LOADED ? NVML_ERROR_UNKNOWN : r;
}

static int handle_index(nvmlDevice_t device, unsigned int *index)
{
    uintptr_t p = (uintptr_t)device;
    uintptr_t base = (uintptr_t)&g_devices[0];

    if (device == NULL || p < base || p >= (uintptr_t)&g_devices[MAX_GPUS])
        return -1;
    if ((p - base) % sizeof(g_devices[0]) != 0)
        return -1;
    *index = (unsigned int)((p - base) / sizeof(g_devices[0]));
    return 0;
}

/*
 * Common prologue for device calls: lock, check init, validate handle and output pointer, load
 * state, check the GPU still exists and is not lost. On NVML_SUCCESS the lock is held and *gpu
 * points into g_state; otherwise the lock has been released.
 */
static nvmlReturn_t device_begin(nvmlDevice_t device, const void *out, struct fake_gpu **gpu,
                                 unsigned int *index_out)
{
    unsigned int index;
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0) {
        r = NVML_ERROR_UNINITIALIZED;
        goto fail;
    }
    if (handle_index(device, &index) != 0 || out == NULL) {
        r = NVML_ERROR_INVALID_ARGUMENT;
        goto fail;
    }
    r = begin_call();
    if (r != NVML_SUCCESS)
        goto fail;
    if (index >= g_state.gpu_count || g_state.gpus[index].lost) {
        r = NVML_ERROR_GPU_IS_LOST;
        goto fail;
    }
    *gpu = &g_state.gpus[index];
    if (index_out != NULL)
        *index_out = index;
    return NVML_SUCCESS;
fail:
    pthread_mutex_unlock(&g_lock);
    return r;
}

static nvmlReturn_t device_end(nvmlReturn_t r)
{
    pthread_mutex_unlock(&g_lock);
    return r;
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    size_t need = strlen(src) + 1;

    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((size_t)length < need)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, need);
    return NVML_SUCCESS;
}

/* ---- exported API ---- */

#define EXPORT __attribute__((visibility("default")))

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    r = load_state();
    if (r == NVML_SUCCESS) {
        unsigned int i;

        for (i = 0; i < MAX_GPUS; i++)
            g_devices[i].index = i;
        g_init_count++;
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlInit(void)
{
    return nvmlInit_v2();
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t r = NVML_SUCCESS;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        g_init_count--;
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "The requested frequency is not supported";
    case 25: return "The provided version is invalid/unsupported";
    case 26: return "The requested functionality has been deprecated";
    case 27: return "The system is not ready for the request";
    case 28: return "No GPUs were found";
    case 29: return "Resource not in correct state to perform requested operation";
    case 30: return "Reset type is not supported";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t system_string(char *buf, unsigned int length, const char *value)
{
    nvmlReturn_t r = NVML_SUCCESS;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else
        r = copy_string(buf, length, value);
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    return system_string(version, length, DRIVER_VERSION);
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    return system_string(version, length, NVML_VERSION);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (deviceCount == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if ((r = begin_call()) == NVML_SUCCESS)
        *deviceCount = g_state.gpu_count;
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t r;

    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0)
        r = NVML_ERROR_UNINITIALIZED;
    else if (device == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if ((r = begin_call()) != NVML_SUCCESS)
        ;
    else if (index >= g_state.gpu_count)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if (g_state.gpus[index].lost)
        r = NVML_ERROR_GPU_IS_LOST;
    else
        *device = &g_devices[index];
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    struct fake_gpu *g;
    unsigned int i;
    nvmlReturn_t r = device_begin(device, index, &g, &i);

    if (r != NVML_SUCCESS)
        return r;
    *index = i;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, name, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    return device_end(copy_string(name, length, g->name));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, uuid, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    return device_end(copy_string(uuid, length, g->uuid));
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device,
                                             nvmlTemperatureSensors_t sensorType,
                                             unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, temp, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (sensorType != 0) /* NVML_TEMPERATURE_GPU */
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    *temp = g->temperature_c;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t device,
                                                      nvmlTemperatureThresholds_t thresholdType,
                                                      unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, temp, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    switch (thresholdType) {
    case 0: /* NVML_TEMPERATURE_THRESHOLD_SHUTDOWN */
        *temp = g->shutdown_c;
        return device_end(NVML_SUCCESS);
    case 1: /* NVML_TEMPERATURE_THRESHOLD_SLOWDOWN */
        *temp = g->slowdown_c;
        return device_end(NVML_SUCCESS);
    default:
        return device_end(NVML_ERROR_NOT_SUPPORTED);
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, power, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *power = g->power_mw;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, limit, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *limit = g->power_limit_mw;
    return device_end(NVML_SUCCESS);
}

static unsigned long long memory_free(const struct fake_gpu *g)
{
    return g->memory_used >= g->memory_total ? 0 : g->memory_total - g->memory_used;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, memory, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    memory->total = g->memory_total;
    memory->used = g->memory_used;
    memory->free = memory_free(g);
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, memory, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    /* Real NVML rejects a struct whose version is not NVML_STRUCT_VERSION(Memory, 2). */
    if (memory->version != NVML_MEMORY_V2_VERSION)
        return device_end(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = g->memory_total;
    memory->reserved = 0;
    memory->used = g->memory_used;
    memory->free = memory_free(g);
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                  nvmlUtilization_t *utilization)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, utilization, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    utilization->gpu = g->util_gpu;
    utilization->memory = g->util_memory;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device,
                                                nvmlMemoryErrorType_t errorType,
                                                nvmlEccCounterType_t counterType,
                                                unsigned long long *eccCounts)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, eccCounts, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (errorType > 1 || counterType > 1)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    if (errorType == 1)
        *eccCounts = counterType == 0 ? g->ecc_uncorrected_volatile : g->ecc_uncorrected_aggregate;
    else
        *eccCounts = counterType == 0 ? g->ecc_corrected_volatile : g->ecc_corrected_aggregate;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, value, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *value = g->pcie_replays;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device,
                                                           nvmlEnableState_t *isPending)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, isPending, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *isPending = g->retired_pages_pending ? 1 : 0;
    return device_end(NVML_SUCCESS);
}

/* Row remapping (Ampere and later): rows remapped for correctable and uncorrectable errors,
 * a remapping waiting for the next GPU reset, and a remapping that failed. */
EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                              unsigned int *uncRows, unsigned int *isPending,
                                              unsigned int *failureOccurred)
{
    struct fake_gpu *g;
    nvmlReturn_t r;

    if (uncRows == NULL || isPending == NULL || failureOccurred == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    r = device_begin(device, corrRows, &g, NULL);
    if (r != NVML_SUCCESS)
        return r;
    *corrRows = g->remapped_rows_correctable;
    *uncRows = g->remapped_rows_uncorrectable;
    *isPending = g->row_remap_pending ? 1 : 0;
    *failureOccurred = g->row_remap_failure ? 1 : 0;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                           unsigned long long *clocksEventReasons)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, clocksEventReasons, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *clocksEventReasons = g->throttle_reasons;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(
    nvmlDevice_t device, unsigned long long *clocksThrottleReasons)
{
    return nvmlDeviceGetCurrentClocksEventReasons(device, clocksThrottleReasons);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                             nvmlEnableState_t *isActive)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, isActive, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (link >= g->nvlink_links)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    *isActive = g->links[link].active ? 1u : 0u;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link,
                                                    nvmlNvLinkErrorCounter_t counter,
                                                    unsigned long long *counterValue)
{
    struct fake_gpu *g;
    const struct fake_link *l;
    nvmlReturn_t r = device_begin(device, counterValue, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    if (link >= g->nvlink_links)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    l = &g->links[link];
    switch (counter) {
    case 0: *counterValue = l->replay_errors; break;   /* NVML_NVLINK_ERROR_DL_REPLAY */
    case 1: *counterValue = l->recovery_errors; break; /* NVML_NVLINK_ERROR_DL_RECOVERY */
    case 2: *counterValue = l->crc_flit_errors; break; /* NVML_NVLINK_ERROR_DL_CRC_FLIT */
    case 3: *counterValue = l->crc_data_errors; break; /* NVML_NVLINK_ERROR_DL_CRC_DATA */
    case 4: *counterValue = 0; break;                  /* NVML_NVLINK_ERROR_DL_ECC_DATA */
    default: return device_end(NVML_ERROR_INVALID_ARGUMENT);
    }
    return device_end(NVML_SUCCESS);
}

/* ---- XID events ---- */

static unsigned int last_xid_seq(void)
{
    unsigned int i, last = 0;

    for (i = 0; i < g_state.xid_count; i++)
        if (g_state.xids[i].seq > last)
            last = g_state.xids[i].seq;
    return last;
}

static int set_index(nvmlEventSet_t set)
{
    uintptr_t p = (uintptr_t)set;
    uintptr_t base = (uintptr_t)&g_sets[0];

    if (set == NULL || p < base || p >= (uintptr_t)&g_sets[MAX_EVENT_SETS])
        return -1;
    if ((p - base) % sizeof(g_sets[0]) != 0 || !set->used)
        return -1;
    return (int)((p - base) / sizeof(g_sets[0]));
}

/* A new set delivers the XIDs written after it was created, as NVML delivers events after
 * registration. */
EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t r;
    unsigned int i;

    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&g_lock);
    r = begin_call();
    if (r == NVML_SUCCESS) {
        r = NVML_ERROR_UNKNOWN;
        for (i = 0; i < MAX_EVENT_SETS; i++) {
            if (!g_sets[i].used) {
                memset(&g_sets[i], 0, sizeof(g_sets[i]));
                g_sets[i].used = 1;
                g_sets[i].delivered = last_xid_seq();
                *set = &g_sets[i];
                r = NVML_SUCCESS;
                break;
            }
        }
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device,
                                                     unsigned long long *eventTypes)
{
    struct fake_gpu *g;
    nvmlReturn_t r = device_begin(device, eventTypes, &g, NULL);

    if (r != NVML_SUCCESS)
        return r;
    *eventTypes = EVENT_TYPE_XID;
    return device_end(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                             nvmlEventSet_t set)
{
    struct fake_gpu *g;
    unsigned int index;
    nvmlReturn_t r = device_begin(device, set, &g, &index);

    if (r != NVML_SUCCESS)
        return r;
    if (set_index(set) < 0)
        return device_end(NVML_ERROR_INVALID_ARGUMENT);
    if ((eventTypes & ~EVENT_TYPE_XID) != 0)
        return device_end(NVML_ERROR_NOT_SUPPORTED);
    set->registered[index] |= eventTypes;
    return device_end(NVML_SUCCESS);
}

/* Delivers the next XID (by seq) of a GPU the set registered, waiting up to timeoutms. */
EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                        unsigned int timeoutms)
{
    unsigned int waited = 0;

    if (data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (;;) {
        nvmlReturn_t r;
        const struct fake_xid *next = NULL;
        unsigned int i;

        pthread_mutex_lock(&g_lock);
        if (set_index(set) < 0) {
            pthread_mutex_unlock(&g_lock);
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        r = begin_call();
        if (r != NVML_SUCCESS) {
            pthread_mutex_unlock(&g_lock);
            return r;
        }
        for (i = 0; i < g_state.xid_count; i++) {
            const struct fake_xid *x = &g_state.xids[i];

            if (x->seq > set->delivered && x->gpu < MAX_GPUS &&
                (set->registered[x->gpu] & EVENT_TYPE_XID) != 0 &&
                (next == NULL || x->seq < next->seq))
                next = x;
        }
        if (next != NULL) {
            set->delivered = next->seq;
            data->device = &g_devices[next->gpu];
            data->eventType = EVENT_TYPE_XID;
            data->eventData = next->code;
            data->gpuInstanceId = 0xFFFFFFFFu;
            data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&g_lock);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&g_lock);
        if (waited >= timeoutms)
            return NVML_ERROR_TIMEOUT;
        {
            struct timespec ts = {0, 20 * 1000 * 1000};

            nanosleep(&ts, NULL);
        }
        waited += 20;
    }
}

EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data,
                                     unsigned int timeoutms)
{
    return nvmlEventSetWait_v2(set, data, timeoutms);
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    pthread_mutex_lock(&g_lock);
    if (set_index(set) < 0) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    set->used = 0;
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}
