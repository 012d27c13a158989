/*
 * state.c - the fake NVML's state: the state file (documented in fake_nvml.c) read and parsed
 * on every call, the one lock, and the common prologue and epilogue of the device calls.
 */
#include "fake_nvml.h"

pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
unsigned int g_init_count; /* nvmlInit reference count */
struct fake_state g_state; /* last parse; only valid under g_lock right after load_state */
static char g_file[FILE_CAP + 1];
struct nvmlDevice_st g_devices[MAX_GPUS]; /* handles are pointers into this array */

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
nvmlReturn_t load_state(void)
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
nvmlReturn_t begin_call(void)
{
    nvmlReturn_t r;

    if (g_init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    r = load_state();
    /* After a successful init a vanished file is an unexpected failure, not "no driver". */
    return r == NVML_ERROR_DRIVER_NOT_LOADED ? NVML_ERROR_UNKNOWN : r;
}

int handle_index(nvmlDevice_t device, unsigned int *index)
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
nvmlReturn_t device_begin(nvmlDevice_t device, const void *out, struct fake_gpu **gpu,
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

nvmlReturn_t device_end(nvmlReturn_t r)
{
    pthread_mutex_unlock(&g_lock);
    return r;
}

nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src)
{
    size_t need = strlen(src) + 1;

    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if ((size_t)length < need)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, need);
    return NVML_SUCCESS;
}
